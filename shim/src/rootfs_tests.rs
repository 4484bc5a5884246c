//! Tests of [`super`] (rootfs.rs) on the real mount table (as root).

use super::*;
use crate::mounts::tests::{mount_tmpfs, options_below, root, Unmount};
use moat_protocol::guest_shared_path;
use nix::sys::stat::{makedev, mknod, Mode as StatMode, SFlag};

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
    let out: Value =
        serde_json::from_slice(&guest_spec(&shared, "c1", &bundle, &guest_shared_path).unwrap())
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

/// critest's non-recursive read-only volume: a hostPath with a writable tmpfs below it,
/// bound `ro`. On the host the tmpfs stays writable; the guest spec gets a bind of it of its
/// own (rw), right after the parent, so the guest's `ro` does not cover it.
#[test]
fn a_ro_volume_keeps_its_writable_submount_writable_in_the_guest() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let _u = Unmount(tmp.path().to_owned());
    let (shared, bundle) = pod(tmp.path());
    let vol = tmp.path().join("vol");
    mount_tmpfs(&vol.join("tmpfs"));
    let spec = serde_json::json!({"mounts": [
        {"destination": "/mnt", "type": "bind", "source": vol, "options": ["rbind", "ro"]},
        {"destination": "/other", "type": "tmpfs", "source": "tmpfs"}
    ]});
    fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    fs::create_dir_all(shared.join("c1")).unwrap();
    let out: Value =
        serde_json::from_slice(&guest_spec(&shared, "c1", &bundle, &guest_shared_path).unwrap())
            .unwrap();
    let mounts = out["mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 3, "{mounts:?}");
    assert_eq!(mounts[1]["destination"], "/mnt/tmpfs");
    assert_eq!(mounts[1]["source"], guest_shared_path("c1/mounts/0/tmpfs"));
    assert!(mounts[1]["options"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o == "rw"));
    assert_eq!(mounts[2]["destination"], "/other");
    let m = shared.join("c1/mounts/0");
    assert_eq!(
        fs::write(m.join("new"), b"x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    fs::write(m.join("tmpfs/new"), b"x").unwrap();
    assert_eq!(fs::read(vol.join("tmpfs/new")).unwrap(), b"x");
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
    mount_tmpfs(&unbindable);
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
