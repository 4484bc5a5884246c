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

use crate::mounts::{
    bind_restricted, check_mounted_at, submounts, unmount_below, MountError, Restriction,
};

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

/// Guest mounts for the host submounts of a read-only bind (`ro`, not `rro`): the host keeps
/// them with their own flags (a writable tmpfs below a read-only hostPath stays writable, as
/// under runc), but virtio-fs shows them to the guest as plain directories of the read-only
/// bind, which the guest's `ro` would cover. So each gets a bind of its own, with its own
/// `ro`/`rw`, mounted after the parent.
fn submount_binds(
    bind: u64,
    dest: &str,
    rel: &str,
    agent_path: &dyn Fn(&str) -> String,
) -> Result<Vec<Value>, RootfsError> {
    Ok(submounts(bind)?
        .into_iter()
        .filter_map(|(sub, ro)| {
            let sub = sub.to_str()?;
            Some(serde_json::json!({
                "destination": format!("{dest}/{sub}"),
                "type": "bind",
                "source": agent_path(&format!("{rel}/{sub}")),
                "options": ["rbind", if ro { "ro" } else { "rw" }, "nosuid", "nodev"],
            }))
        })
        .collect())
}

/// Reads the bundle's `config.json` and rewrites it for the guest:
/// - a namespace joined by path (the pod's network namespace from CRI) is dropped: inside the VM
///   the pod's network is the VM's own;
/// - every bind mount of a host path is bound into `<shared>/<id>/mounts/<n>` and its source
///   rewritten to the guest path of that copy; a read-only one's host submounts get guest binds
///   of their own ([`submount_binds`]).
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
        // Guest binds of a read-only volume's host submounts, to go right after it (index).
        let mut extra: Vec<(usize, Vec<Value>)> = Vec::new();
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
            let bind = bind_restricted(&src, true, target.fd.as_fd(), &target.shown, restriction)?;
            m["source"] = Value::String(agent_path(&rel));
            if restriction == Restriction::READ_ONLY && meta.is_dir() {
                let dest = m
                    .get("destination")
                    .and_then(Value::as_str)
                    .unwrap_or("/")
                    .trim_end_matches('/')
                    .to_owned();
                let subs = submount_binds(bind, &dest, &rel, agent_path)?;
                if !subs.is_empty() {
                    extra.push((n, subs));
                }
            }
        }
        for (n, subs) in extra.into_iter().rev() {
            for (k, sub) in subs.into_iter().enumerate() {
                mounts.insert(n + 1 + k, sub);
            }
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
#[path = "rootfs_tests.rs"]
mod tests;
