//! Getting a container's files into its pod VM: the rootfs containerd prepared (snapshot mounts,
//! or a ready `rootfs/` in the bundle) and the host paths its spec bind-mounts, each mounted below
//! the pod's shared directory, which the guest sees over virtio-fs. Also the spec rewrite that
//! goes with it, and unmounting everything again.
//!
//! Below the shared directory, per container: `<id>/rootfs` (the root file system) and
//! `<id>/mounts/<n>` (bind-mount sources). How the agent names those paths (in a VM:
//! [`moat_protocol::guest_shared_path`], `/run/moat/virtiofs/moatfs/<id>/…`) is the caller's
//! to say.
//!
//! The guest and its kernel are hostile, so what the spec asks for is enforced here, on the host
//! side of the share, not only by the agent: every mount below the shared directory is
//! `nodev,nosuid` on the host, and a bind the spec marks `ro` is read-only on the host (with all
//! its submounts) — restricted before it is attached and checked after ([`crate::mounts`]). A
//! container whose mount cannot be restricted is not created.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use serde_json::Value;
use tracing::warn;

use crate::mounts::{bind_restricted, check_mounted_at, unmount_below, MountError, Restriction};

/// Errors preparing a container's files.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A container or exec id that cannot name a directory.
    #[error("container id {0:?} is not usable as a path component")]
    BadId(String),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A bind mount failed, or a mount could not be restricted (`ro`, `nodev`, `nosuid`) on
    /// the host; the message names the mount.
    #[error(transparent)]
    Restrict(#[from] MountError),
    /// One of containerd's snapshot mounts failed.
    #[error("mount of the container rootfs failed: {fstype} on {target}: {source}")]
    Rootfs {
        /// The mount's type.
        fstype: String,
        /// The rootfs directory.
        target: PathBuf,
        /// The error.
        #[source]
        source: containerd_shim::Error,
    },
    /// The bundle's `config.json` is not JSON.
    #[error("bundle config.json: {0}")]
    Spec(#[source] serde_json::Error),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.to_owned();
    move |source| RootfsError::Io { what, path, source }
}

/// Rejects ids that are not a single, plain path component.
pub fn check_id(id: &str) -> Result<(), RootfsError> {
    let ok = !id.is_empty()
        && id.len() <= 255
        && id != "."
        && id != ".."
        && !id.contains('/')
        && !id.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(RootfsError::BadId(id.to_owned()))
    }
}

/// A directory or file the shim created below the shared directory, held open: mounting on
/// [`Pinned::path`] (`/proc/self/fd/<n>`) lands on exactly that inode. The guest can write the
/// shared directory, so a path there may have been swapped for a symlink to a host path by the
/// time the shim mounts on it; an fd cannot be.
struct Pinned {
    fd: OwnedFd,
    /// The ordinary path, for messages.
    shown: PathBuf,
}

impl Pinned {
    /// Opens `dir`, which must be a real directory (not a symlink).
    fn open_dir(dir: &Path) -> Result<Self, RootfsError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir)
            .map_err(io_err("open", dir))?;
        Ok(Self {
            fd: file.into(),
            shown: dir.to_owned(),
        })
    }

    /// Opens the existing directory `name` inside this one without following a symlink.
    fn open_child_dir(&self, name: &str) -> Result<Self, RootfsError> {
        self.at(
            name,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY,
            Mode::empty(),
        )
    }

    /// Creates directory `name` inside this one; an existing entry of that name is an error.
    fn new_dir(&self, name: &str) -> Result<Self, RootfsError> {
        mkdirat(
            Some(self.fd.as_raw_fd()),
            name,
            Mode::from_bits_truncate(0o755),
        )
        .map_err(|errno| io_err("create", &self.shown.join(name))(errno.into()))?;
        self.open_child_dir(name)
    }

    /// Creates the empty file `name` inside this one; an existing entry is an error.
    fn new_file(&self, name: &str) -> Result<Self, RootfsError> {
        self.at(
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o644),
        )
    }

    fn at(&self, name: &str, flags: OFlag, mode: Mode) -> Result<Self, RootfsError> {
        let shown = self.shown.join(name);
        let fd = openat(
            Some(self.fd.as_raw_fd()),
            name,
            flags | OFlag::O_CLOEXEC,
            mode,
        )
        .map_err(|errno| io_err("open", &shown)(errno.into()))?;
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, shown })
    }

    /// The path a mount(2) in this process (or a child forked from it) can target.
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Mounts the container's rootfs at `<shared>/<id>/rootfs`: containerd's snapshot mounts when
/// given, otherwise a bind of the bundle's `rootfs/`, each `nodev,nosuid` on the host (binds
/// marked `ro` read-only too). Returns the path relative to the shared directory.
/// `<shared>/<id>` must not exist yet (the guest may have planted it).
pub fn mount_rootfs(
    shared: &Path,
    id: &str,
    bundle: &Path,
    mounts: &[Mount],
) -> Result<String, RootfsError> {
    check_id(id)?;
    let dir = Pinned::open_dir(shared)?.new_dir(id)?;
    let rootfs = dir.new_dir("rootfs")?;
    if mounts.is_empty() {
        let src = bundle.join("rootfs");
        bind_restricted(
            &src,
            true,
            rootfs.fd.as_fd(),
            &rootfs.shown,
            Restriction::WRITABLE,
        )?;
    } else {
        for m in mounts {
            if is_bind(&m.type_, &m.options) {
                // The native snapshotter's `bind` (rw) and `bind,ro` views.
                bind_restricted(
                    Path::new(&m.source),
                    true,
                    rootfs.fd.as_fd(),
                    &rootfs.shown,
                    restriction_of(&m.options),
                )?;
                continue;
            }
            // A new mount (overlay, …) gets its flags at creation, before it is attached: every
            // propagated copy has them too.
            let mut options = m.options.clone();
            options.extend(["nodev".to_owned(), "nosuid".to_owned()]);
            let fstype = (!m.type_.is_empty()).then_some(m.type_.as_str());
            let source = (!m.source.is_empty()).then_some(m.source.as_str());
            containerd_shim::mount::mount_rootfs(fstype, source, &options, rootfs.path()).map_err(
                |source| RootfsError::Rootfs {
                    fstype: m.type_.clone(),
                    target: rootfs.shown.clone(),
                    source,
                },
            )?;
        }
    }
    check_mounted_at(
        dir.fd.as_fd(),
        "rootfs",
        &rootfs.shown,
        Restriction::WRITABLE,
    )?;
    Ok(format!("{id}/rootfs"))
}

/// Whether a mount (OCI or containerd) is a bind: type `bind` or a `bind`/`rbind` option.
fn is_bind<S: AsRef<str>>(fstype: &str, options: &[S]) -> bool {
    fstype == "bind"
        || options
            .iter()
            .any(|o| matches!(o.as_ref(), "bind" | "rbind"))
}

/// `ro` among the options: the bind read-only on the host (runc's `rbind,ro`: host mounts below
/// the source keep their flags); runc's recursive `rro`: every mount of it read-only.
fn restriction_of<S: AsRef<str>>(options: &[S]) -> Restriction {
    if options.iter().any(|o| o.as_ref() == "rro") {
        Restriction::READ_ONLY_RECURSIVE
    } else if options.iter().any(|o| o.as_ref() == "ro") {
        Restriction::READ_ONLY
    } else {
        Restriction::WRITABLE
    }
}

/// Reads the bundle's `config.json` and rewrites it for the guest:
/// - a namespace joined by path (the pod's network namespace from CRI) is dropped: inside the VM
///   the pod's network is the VM's own;
/// - every bind mount of a host path is bound into `<shared>/<id>/mounts/<n>` and its source
///   rewritten to the guest path of that copy.
///
/// `agent_path` names a path relative to the shared directory as the agent sees it.
///
/// Returns the spec as JSON bytes for the agent.
pub fn guest_spec(
    shared: &Path,
    id: &str,
    bundle: &Path,
    agent_path: &dyn Fn(&str) -> String,
) -> Result<Vec<u8>, RootfsError> {
    check_id(id)?;
    let path = bundle.join("config.json");
    let text = fs::read(&path).map_err(io_err("read", &path))?;
    let mut spec: Value = serde_json::from_slice(&text).map_err(RootfsError::Spec)?;

    if let Some(namespaces) = spec
        .pointer_mut("/linux/namespaces")
        .and_then(Value::as_array_mut)
    {
        namespaces.retain(|ns| {
            ns.get("path")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        });
    }

    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        // Created on first use, by fd (see [`Pinned`]).
        let mut mounts_dir: Option<Pinned> = None;
        for (n, m) in mounts.iter_mut().enumerate() {
            let options: Vec<&str> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| o.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let is_bind = is_bind(
                m.get("type").and_then(Value::as_str).unwrap_or(""),
                &options,
            );
            let restriction = restriction_of(&options);
            let Some(src) = m.get("source").and_then(Value::as_str).map(PathBuf::from) else {
                continue;
            };
            if !is_bind || !src.is_absolute() {
                continue;
            }
            let meta = fs::metadata(&src).map_err(io_err("bind-mount source", &src))?;
            let rel = format!("{id}/mounts/{n}");
            let dir = match mounts_dir.take() {
                Some(d) => d,
                None => Pinned::open_dir(shared)?
                    .open_child_dir(id)?
                    .new_dir("mounts")?,
            };
            let name = n.to_string();
            let target = if meta.is_dir() {
                dir.new_dir(&name)?
            } else {
                dir.new_file(&name)?
            };
            mounts_dir = Some(dir);
            bind_restricted(&src, true, target.fd.as_fd(), &target.shown, restriction)?;
            m["source"] = Value::String(agent_path(&rel));
        }
    }
    serde_json::to_vec(&spec).map_err(RootfsError::Spec)
}

/// Removes a container's part of the shared directory (after unmounting it).
pub fn remove_container_files(shared: &Path, id: &str) {
    if check_id(id).is_err() {
        return;
    }
    let dir = shared.join(id);
    if !unmount_below(&dir) {
        return;
    }
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("remove {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_protocol::guest_shared_path;

    #[test]
    fn ids_must_be_one_plain_component() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("abc-123_x.y").is_ok());
    }

    #[test]
    fn spec_rewrite_drops_joined_namespaces_and_rebinds_host_paths() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        let shared = tmp.path().join("shared");
        fs::create_dir_all(&bundle).unwrap();
        fs::create_dir_all(&shared).unwrap();
        let spec = serde_json::json!({
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"}
            ]
        });
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let out: Value = serde_json::from_slice(
            &guest_spec(&shared, "c1", &bundle, &guest_shared_path).unwrap(),
        )
        .unwrap();
        let ns = out
            .pointer("/linux/namespaces")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0]["type"], "pid");
        assert_eq!(out["mounts"][0]["source"], "proc");
    }

    /// The guest can write the shared directory: entries it plants where the shim is about to
    /// create a container's files must not redirect the shim's mounts onto host paths.
    #[test]
    fn entries_planted_in_the_shared_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        let outside = tmp.path().join("host-dir");
        fs::create_dir_all(&shared).unwrap();
        fs::create_dir_all(&outside).unwrap();
        let bundle = tmp.path().join("bundle");
        fs::create_dir_all(bundle.join("rootfs")).unwrap();

        // `<shared>/<id>` planted as a symlink to a host directory.
        std::os::unix::fs::symlink(&outside, shared.join("c1")).unwrap();
        let err = mount_rootfs(&shared, "c1", &bundle, &[]).unwrap_err();
        assert!(err.to_string().contains("c1"), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        // `<shared>/<id>/mounts` planted as a symlink: the bind targets are not created there.
        fs::create_dir_all(shared.join("c2")).unwrap();
        std::os::unix::fs::symlink(&outside, shared.join("c2/mounts")).unwrap();
        let source = tmp.path().join("source-file");
        fs::write(&source, b"x").unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/x", "type": "bind", "source": source, "options": ["rbind"]}
        ]});
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        let err = guest_spec(&shared, "c2", &bundle, &guest_shared_path).unwrap_err();
        assert!(err.to_string().contains("mounts"), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        // `<shared>/<id>` itself replaced by a symlink before the bind mounts are prepared.
        std::os::unix::fs::symlink(&outside, shared.join("c3")).unwrap();
        let err = guest_spec(&shared, "c3", &bundle, &guest_shared_path).unwrap_err();
        assert!(err.to_string().contains("c3"), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        // Removing the planted entries removes the links, not what they point at.
        remove_container_files(&shared, "c1");
        assert!(!shared.join("c1").exists() && outside.is_dir());
    }

    use crate::mounts::tests::{options_below, root, Unmount};
    use nix::sys::stat::{makedev, mknod, Mode as StatMode, SFlag};

    /// A pod shared directory as the shim makes it, and a bundle.
    fn pod(tmp: &Path) -> (PathBuf, PathBuf) {
        let shared = tmp.join("shared");
        let bundle = tmp.join("bundle");
        fs::create_dir_all(&shared).unwrap();
        fs::create_dir_all(&bundle).unwrap();
        crate::mounts::make_share(&shared).unwrap();
        (shared, bundle)
    }

    fn assert_restricted(dir: &Path, ro: bool) {
        let lines = options_below(dir);
        assert!(!lines.is_empty(), "nothing mounted at {}", dir.display());
        for (point, options) in lines {
            let o: Vec<&str> = options.split(',').collect();
            assert!(
                o.contains(&"nodev") && o.contains(&"nosuid"),
                "{point:?}: {options}"
            );
            assert_eq!(o.contains(&"ro"), ro, "{point:?}: {options}");
        }
    }

    fn null_device(at: &Path) {
        mknod(
            at,
            SFlag::S_IFCHR,
            StatMode::from_bits_truncate(0o666),
            makedev(1, 3),
        )
        .unwrap();
    }

    fn open_errno(p: &Path) -> Option<i32> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .err()
            .and_then(|e| e.raw_os_error())
    }

    /// The bundle's rootfs and containerd's overlay snapshot: both `nodev,nosuid` on the host, so
    /// a device node in them (put there by an image or by the guest) cannot be opened on the
    /// host side of the share.
    #[test]
    fn rootfs_mounts_are_nodev_nosuid() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let _u = Unmount(tmp.path().to_owned());
        let (shared, bundle) = pod(tmp.path());
        fs::create_dir_all(bundle.join("rootfs")).unwrap();
        null_device(&bundle.join("rootfs/null"));
        assert_eq!(
            mount_rootfs(&shared, "c1", &bundle, &[]).unwrap(),
            "c1/rootfs"
        );
        assert_restricted(&shared.join("c1/rootfs"), false);
        assert_eq!(
            open_errno(&shared.join("c1/rootfs/null")),
            Some(libc::EACCES)
        );
        fs::write(shared.join("c1/rootfs/new"), b"rw").unwrap();

        for d in ["lower", "upper", "work"] {
            fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        null_device(&tmp.path().join("lower/null"));
        let overlay = Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("lowerdir={}", tmp.path().join("lower").display()),
                format!("upperdir={}", tmp.path().join("upper").display()),
                format!("workdir={}", tmp.path().join("work").display()),
            ],
            ..Default::default()
        };
        mount_rootfs(&shared, "c2", &bundle, &[overlay]).unwrap();
        assert_restricted(&shared.join("c2/rootfs"), false);
        assert_eq!(
            open_errno(&shared.join("c2/rootfs/null")),
            Some(libc::EACCES)
        );

        // containerd's native snapshotter hands out binds; a `ro` view is read-only.
        fs::create_dir_all(tmp.path().join("snap")).unwrap();
        let view = Mount {
            type_: "bind".into(),
            source: tmp.path().join("snap").to_string_lossy().into_owned(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        mount_rootfs(&shared, "c3", &bundle, &[view]).unwrap();
        assert_restricted(&shared.join("c3/rootfs"), true);

        remove_container_files(&shared, "c1");
        remove_container_files(&shared, "c2");
        remove_container_files(&shared, "c3");
        assert_eq!(
            options_below(&shared).len(),
            1,
            "only the share itself is left"
        );
    }

    /// `ro` binds (Secrets, ConfigMaps, /etc/hosts, resolv.conf: directories and files) are
    /// read-only on the host side of the share; the others are writable but `nodev,nosuid`.
    #[test]
    fn spec_binds_are_restricted_on_the_host() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let _u = Unmount(tmp.path().to_owned());
        let (shared, bundle) = pod(tmp.path());
        let secret = tmp.path().join("secret");
        let data = tmp.path().join("data");
        let hosts = tmp.path().join("hosts");
        fs::create_dir_all(&secret).unwrap();
        fs::create_dir_all(&data).unwrap();
        fs::write(secret.join("key"), b"s3cret").unwrap();
        fs::write(&hosts, b"127.0.0.1 localhost\n").unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/secret", "type": "bind", "source": secret, "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rro"]},
            {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]}
        ]});
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        fs::create_dir_all(shared.join("c1")).unwrap();
        guest_spec(&shared, "c1", &bundle, &guest_shared_path).unwrap();

        let m = shared.join("c1/mounts");
        assert_restricted(&m.join("1"), true);
        assert_restricted(&m.join("2"), true);
        assert_restricted(&m.join("3"), false);
        let erofs = |p: &Path| fs::write(p, b"x").unwrap_err().raw_os_error();
        assert_eq!(erofs(&m.join("1/key")), Some(libc::EROFS));
        assert_eq!(erofs(&m.join("1/new")), Some(libc::EROFS));
        assert_eq!(erofs(&m.join("2")), Some(libc::EROFS));
        assert_eq!(fs::read(secret.join("key")).unwrap(), b"s3cret");
        fs::write(m.join("3/written"), b"ok").unwrap();
        assert_eq!(fs::read(data.join("written")).unwrap(), b"ok");
    }

    /// A ro volume that cannot be bound restricted: the create fails naming the mount, and
    /// nothing of it stays mounted.
    #[test]
    fn unrestrictable_bind_fails_the_create_and_leaves_nothing() {
        if !root() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let _u = Unmount(tmp.path().to_owned());
        let (shared, bundle) = pod(tmp.path());
        let ok = tmp.path().join("ok");
        let unbindable = tmp.path().join("unbindable");
        fs::create_dir_all(&ok).unwrap();
        fs::create_dir_all(&unbindable).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &unbindable,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        nix::mount::mount(
            None::<&str>,
            &unbindable,
            None::<&str>,
            nix::mount::MsFlags::MS_UNBINDABLE,
            None::<&str>,
        )
        .unwrap();
        let spec = serde_json::json!({"mounts": [
            {"destination": "/ok", "type": "bind", "source": ok, "options": ["rbind", "ro"]},
            {"destination": "/secret", "type": "bind", "source": unbindable, "options": ["rbind", "ro"]}
        ]});
        fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        fs::create_dir_all(shared.join("c1")).unwrap();
        let err = guest_spec(&shared, "c1", &bundle, &guest_shared_path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, RootfsError::Restrict(_)), "{msg}");
        assert!(
            msg.contains(&*unbindable.to_string_lossy()) && msg.contains("c1/mounts/1"),
            "{msg}"
        );
        assert!(options_below(&shared.join("c1/mounts/1")).is_empty());
        // What the create had mounted before goes with the container's files (as task.rs does).
        remove_container_files(&shared, "c1");
        assert_eq!(
            options_below(&shared).len(),
            1,
            "only the share itself is left"
        );
        assert!(!shared.join("c1").exists());
    }

    #[test]
    fn malformed_spec_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("config.json"), b"{not json").unwrap();
        let err = guest_spec(tmp.path(), "c1", tmp.path(), &guest_shared_path).unwrap_err();
        assert!(matches!(err, RootfsError::Spec(_)), "{err}");
        let err = guest_spec(tmp.path(), "../x", tmp.path(), &guest_shared_path).unwrap_err();
        assert!(matches!(err, RootfsError::BadId(_)), "{err}");
    }
}
