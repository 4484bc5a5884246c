//! Where the agent keeps files and mounts, and the mounting of storage the shim hands over:
//! the state directory layout (sandbox files, virtio-fs shares, block devices), a
//! container's rootfs source (a host path, a directory of a virtio-fs share, or a block
//! device), the sandbox's shared mounts, and their unmounting.
//!
//! In the guest the state directory is [`GUEST_STATE_DIR`] and virtio-fs shares are mounted
//! under [`GUEST_VIRTIOFS_ROOT`], where the shim expects them; `--state-dir DIR` (host tests)
//! moves the whole layout under `DIR`, shares under `DIR/virtiofs`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use moat_protocol::agent as pb;
use moat_protocol::{GUEST_STATE_DIR, GUEST_VIRTIOFS_ROOT};
use nix::mount::MsFlags;
use oci_spec::runtime::Spec;

use crate::error::{AgentError, Result};
use crate::rootfs::parse_options;
use crate::sync::LockExt;
use crate::validate::{check_name, check_rel};

/// A container's root directory, as the agent sees it.
#[derive(Debug)]
pub struct Rootfs {
    /// The directory the container's `/` is bind-mounted from.
    pub path: PathBuf,
    /// A mount made for this container alone (a block device), unmounted with it.
    pub mount: Option<PathBuf>,
}

/// The state directory and the virtio-fs shares mounted so far (each tag once, shared by
/// every container that uses it, unmounted with the sandbox).
pub struct Storage {
    state_dir: PathBuf,
    virtiofs: Mutex<HashMap<String, PathBuf>>,
}

/// Detaches the mount at `p` (a failure is logged) and removes the then empty mount point.
pub fn umount(p: &Path) {
    if let Err(e) = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH) {
        tracing::warn!("unmounting {}: {e}", p.display());
    }
    let _ = std::fs::remove_dir(p);
}

fn create_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|source| AgentError::Io {
        what: format!("creating {}", p.display()),
        source,
    })
}

impl Storage {
    /// Storage under `state_dir` ([`GUEST_STATE_DIR`] in the guest).
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            state_dir,
            virtiofs: Mutex::new(HashMap::new()),
        }
    }

    /// The sandbox's own directory: `resolv.conf` and the shared mounts (`shared/<name>`).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("sandbox").join(id)
    }

    /// Where virtio-fs shares are mounted (`<root>/<tag>`): [`GUEST_VIRTIOFS_ROOT`] for the
    /// guest's state directory, the same place relative to any other.
    pub fn virtiofs_root(&self) -> PathBuf {
        match Path::new(GUEST_VIRTIOFS_ROOT).strip_prefix(GUEST_STATE_DIR) {
            Ok(rel) => self.state_dir.join(rel),
            Err(_) => PathBuf::from(GUEST_VIRTIOFS_ROOT),
        }
    }

    /// Where the block device of container `id` is mounted.
    fn block_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("block").join(id)
    }

    /// Mounts the sandbox's shared mount `m` on `<sandbox dir>/shared/<name>`; returns the
    /// mount point.
    pub fn mount_shared(&self, sandbox_dir: &Path, m: &pb::SharedMount) -> Result<PathBuf> {
        let target = sandbox_dir.join("shared").join(&m.name);
        create_dir(&target)?;
        let (flags, _prop, data) = parse_options(&m.options);
        let (fstype, flags) = if m.fstype == "bind" {
            (None, flags | MsFlags::MS_BIND)
        } else {
            (Some(m.fstype.as_str()), flags)
        };
        nix::mount::mount(
            Some(m.source.as_str()),
            &target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|source| AgentError::Sys {
            what: format!(
                "mounting shared {:?} ({}) on {}",
                m.name,
                m.source,
                target.display()
            ),
            source,
        })?;
        Ok(target)
    }

    /// Finds (and mounts, for virtio-fs and block sources) the rootfs of container `id`.
    pub fn rootfs(&self, id: &str, spec: &Spec, rootfs: Option<&pb::Rootfs>) -> Result<Rootfs> {
        use pb::rootfs::Source;
        let src = rootfs.and_then(|r| r.source.as_ref()).ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "rootfs source missing (spec root.path {:?} is a host path)",
                spec.root().as_ref().map(|r| r.path().display().to_string())
            ))
        })?;
        match src {
            Source::HostPath(h) => {
                let p = PathBuf::from(&h.path);
                if p.components().any(|c| c == Component::ParentDir) {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs host path {:?} must not contain \"..\"",
                        h.path
                    )));
                }
                if !p.is_absolute() || !p.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs host path {:?} is not an existing absolute directory",
                        h.path
                    )));
                }
                Ok(Rootfs {
                    path: p,
                    mount: None,
                })
            }
            Source::VirtioFs(v) => {
                check_name("virtio-fs tag", &v.tag)?;
                check_rel("virtio-fs rootfs path", &v.path)?;
                let root = self.virtiofs_share(&v.tag)?.join(&v.path);
                let md = std::fs::symlink_metadata(&root).map_err(|source| AgentError::Io {
                    what: format!("rootfs {}", root.display()),
                    source,
                })?;
                if !md.is_dir() {
                    return Err(AgentError::InvalidArgument(format!(
                        "rootfs {} is not a directory",
                        root.display()
                    )));
                }
                Ok(Rootfs {
                    path: root,
                    mount: None,
                })
            }
            Source::Block(b) => {
                check_rel("block rootfs path", &b.path)?;
                if !b.device.starts_with("/dev/") || b.device.contains("..") {
                    return Err(AgentError::InvalidArgument(format!(
                        "block device {:?}",
                        b.device
                    )));
                }
                let mnt = self.block_dir(id);
                create_dir(&mnt)?;
                let (flags, _, data) = parse_options(&b.options);
                let fstype = if b.fstype.is_empty() {
                    "ext4"
                } else {
                    b.fstype.as_str()
                };
                if let Err(source) = nix::mount::mount(
                    Some(b.device.as_str()),
                    &mnt,
                    Some(fstype),
                    flags,
                    (!data.is_empty()).then_some(data.as_str()),
                ) {
                    let _ = std::fs::remove_dir(&mnt);
                    return Err(AgentError::Sys {
                        what: format!("mounting {} ({fstype})", b.device),
                        source,
                    });
                }
                Ok(Rootfs {
                    path: mnt.join(&b.path),
                    mount: Some(mnt),
                })
            }
            _ => Err(AgentError::InvalidArgument("unknown rootfs source".into())),
        }
    }

    /// The mount point of the virtio-fs share `tag`, mounted on first use.
    fn virtiofs_share(&self, tag: &str) -> Result<PathBuf> {
        let mut map = self.virtiofs.lock_or_recover();
        if let Some(p) = map.get(tag) {
            return Ok(p.clone());
        }
        let p = self.virtiofs_root().join(tag);
        create_dir(&p)?;
        nix::mount::mount(
            Some(tag),
            &p,
            Some("virtiofs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| AgentError::Sys {
            what: format!("mounting virtio-fs tag {tag:?}"),
            source,
        })?;
        map.insert(tag.to_owned(), p.clone());
        Ok(p)
    }

    /// Unmounts every virtio-fs share (the sandbox is gone).
    pub fn unmount_shares(&self) {
        let shares: Vec<PathBuf> = self
            .virtiofs
            .lock_or_recover()
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in shares {
            umount(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofs_root_follows_the_protocol_constant() {
        let guest = Storage::new(GUEST_STATE_DIR.into());
        assert_eq!(guest.virtiofs_root(), Path::new(GUEST_VIRTIOFS_ROOT));
        let host = Storage::new("/tmp/state".into());
        assert_eq!(host.virtiofs_root(), Path::new("/tmp/state/virtiofs"));
        assert_eq!(host.sandbox_dir("sb"), Path::new("/tmp/state/sandbox/sb"));
    }
}
