//! Getting a container's files into its pod VM: the rootfs containerd prepared (snapshot mounts,
//! or a ready `rootfs/` in the bundle) and the host paths its spec bind-mounts, each mounted below
//! the pod's shared directory, which the guest sees over virtio-fs. Also the spec rewrite that
//! goes with it, and unmounting everything again.
//!
//! Below the shared directory, per container: `<id>/rootfs` (the root file system) and
//! `<id>/mounts/<n>` (bind-mount sources), so the guest paths are
//! `/run/moat/virtiofs/moatfs/<id>/…`.

use std::fs;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use log::warn;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use serde_json::Value;

use crate::sandbox::Sandbox;

/// Errors preparing a container's files.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("container id {0:?} is not usable as a path component")]
    BadId(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {source_path} on {target}: {errno}")]
    Mount {
        source_path: String,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("mount of the container rootfs failed: {0}")]
    Rootfs(String),
    #[error("bundle config.json: {0}")]
    Spec(String),
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

/// Mounts the container's rootfs at `<shared>/<id>/rootfs`: containerd's snapshot mounts when
/// given, otherwise a bind of the bundle's `rootfs/`. Returns the path relative to the shared
/// directory.
pub fn mount_rootfs(
    shared: &Path,
    id: &str,
    bundle: &Path,
    mounts: &[Mount],
) -> Result<String, RootfsError> {
    check_id(id)?;
    let target = shared.join(id).join("rootfs");
    fs::create_dir_all(&target).map_err(io_err("create", &target))?;
    if mounts.is_empty() {
        let src = bundle.join("rootfs");
        bind(&src, &target)?;
    } else {
        for m in mounts {
            let fstype = (!m.type_.is_empty()).then_some(m.type_.as_str());
            let source = (!m.source.is_empty()).then_some(m.source.as_str());
            containerd_shim::mount::mount_rootfs(fstype, source, &m.options, &target).map_err(
                |e| RootfsError::Rootfs(format!("{} on {}: {e}", m.type_, target.display())),
            )?;
        }
    }
    Ok(format!("{id}/rootfs"))
}

fn bind(src: &Path, target: &Path) -> Result<(), RootfsError> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|errno| RootfsError::Mount {
        source_path: src.display().to_string(),
        target: target.to_owned(),
        errno,
    })
}

/// Reads the bundle's `config.json` and rewrites it for the guest:
/// - a namespace joined by path (the pod's network namespace from CRI) is dropped: inside the VM
///   the pod's network is the VM's own;
/// - every bind mount of a host path is bound into `<shared>/<id>/mounts/<n>` and its source
///   rewritten to the guest path of that copy.
///
/// Returns the spec as JSON bytes for the agent.
pub fn guest_spec(shared: &Path, id: &str, bundle: &Path) -> Result<Vec<u8>, RootfsError> {
    check_id(id)?;
    let path = bundle.join("config.json");
    let text = fs::read(&path).map_err(io_err("read", &path))?;
    let mut spec: Value =
        serde_json::from_slice(&text).map_err(|e| RootfsError::Spec(e.to_string()))?;

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
        for (n, m) in mounts.iter_mut().enumerate() {
            let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
                || m.get("options")
                    .and_then(Value::as_array)
                    .is_some_and(|o| o.iter().any(|v| v == "bind" || v == "rbind"));
            let Some(src) = m.get("source").and_then(Value::as_str).map(PathBuf::from) else {
                continue;
            };
            if !is_bind || !src.is_absolute() {
                continue;
            }
            let meta = fs::metadata(&src).map_err(io_err("bind-mount source", &src))?;
            let rel = format!("{id}/mounts/{n}");
            let target = shared.join(&rel);
            if meta.is_dir() {
                fs::create_dir_all(&target).map_err(io_err("create", &target))?;
            } else {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_err("create", parent))?;
                }
                fs::write(&target, b"").map_err(io_err("create", &target))?;
            }
            bind(&src, &target)?;
            m["source"] = Value::String(Sandbox::guest_path(&rel));
        }
    }
    serde_json::to_vec(&spec).map_err(|e| RootfsError::Spec(e.to_string()))
}

/// Unmounts everything mounted at or below `dir` (deepest first, lazily) — container rootfs,
/// bind sources — so the directory can be removed.
pub fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut targets: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    targets.dedup();
    for t in targets {
        if let Err(e) = umount2(&t, MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                warn!("unmount {}: {e}", t.display());
            }
        }
    }
}

/// Removes a container's part of the shared directory (after unmounting it).
pub fn remove_container_files(shared: &Path, id: &str) {
    if check_id(id).is_err() {
        return;
    }
    let dir = shared.join(id);
    unmount_below(&dir);
    if let Err(e) = fs::remove_dir_all(&dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("remove {}: {e}", dir.display());
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
mod tests {
    use super::*;

    #[test]
    fn ids_must_be_one_plain_component() {
        for bad in ["", ".", "..", "a/b", "../x", "a\0b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("abc-123_x.y").is_ok());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
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
        let out: Value =
            serde_json::from_slice(&guest_spec(&shared, "c1", &bundle).unwrap()).unwrap();
        let ns = out
            .pointer("/linux/namespaces")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(ns.len(), 1);
        assert_eq!(ns[0]["type"], "pid");
        assert_eq!(out["mounts"][0]["source"], "proc");
    }

    #[test]
    fn malformed_spec_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("config.json"), b"{not json").unwrap();
        let err = guest_spec(tmp.path(), "c1", tmp.path()).unwrap_err();
        assert!(matches!(err, RootfsError::Spec(_)), "{err}");
        let err = guest_spec(tmp.path(), "../x", tmp.path()).unwrap_err();
        assert!(matches!(err, RootfsError::BadId(_)), "{err}");
    }
}
