//! A local busybox container image: an OCI image-layout tarball with one layer holding
//! Debian's busybox-static and its applets, built without any registry. `ctr image import`
//! takes it. Used by `moat demo`, the E2E trials and the benchmarks.
//!
//! The layer is made reproducible (sorted, owner 0, mtime 0), so the same busybox gives the
//! same digests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where busybox-static lives on Debian.
pub const BUSYBOX: &str = "/bin/busybox";

/// Errors building the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A file system step failed.
    #[error("building the busybox image: {what}: {source}")]
    Io {
        /// The step that failed.
        what: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A helper command (busybox, tar, sha256sum) failed.
    #[error("building the busybox image: `{command}` failed: {detail}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status and standard error.
        detail: String,
    },
}

fn io<T>(what: impl Into<String>, r: std::io::Result<T>) -> Result<T, ImageError> {
    r.map_err(|source| ImageError::Io {
        what: what.into(),
        source,
    })
}

fn run(cmd: &mut Command) -> Result<Vec<u8>, ImageError> {
    let command = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| ImageError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Command {
            command,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let out = run(Command::new("sha256sum").arg(path))?;
    Ok(String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn write_blob(blobs: &Path, data: &[u8]) -> Result<String, ImageError> {
    let tmp = blobs.join("tmp");
    io("write a blob", fs::write(&tmp, data))?;
    let digest = sha256_file(&tmp)?;
    io("name a blob", fs::rename(&tmp, blobs.join(&digest)))?;
    Ok(digest)
}

/// Builds, under the (scratch) directory `dir`, an OCI image-layout tarball whose only image is
/// named `name` (e.g. `docker.io/library/moat-busybox:e2e`): busybox-static with its applets
/// linked into /bin, `PATH=/bin`, default command `sh`. Returns the tarball's path.
pub fn build_busybox_image(dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    if !Path::new(BUSYBOX).is_file() {
        return Err(ImageError::Io {
            what: format!("{BUSYBOX} is missing (apt-get install busybox-static)"),
            source: std::io::ErrorKind::NotFound.into(),
        });
    }
    let rootfs = dir.join("rootfs");
    let blobs = dir.join("layout/blobs/sha256");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        io("create the rootfs", fs::create_dir_all(rootfs.join(d)))?;
    }
    io("create the blob directory", fs::create_dir_all(&blobs))?;
    io(
        format!("copy {BUSYBOX}"),
        fs::copy(BUSYBOX, rootfs.join("bin/busybox")),
    )?;
    let list = run(Command::new(BUSYBOX).arg("--list"))?;
    for applet in String::from_utf8_lossy(&list).lines() {
        if applet != "busybox" && !applet.is_empty() && !applet.contains('/') {
            io(
                format!("link applet {applet}"),
                std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)),
            )?;
        }
    }
    io(
        "write /etc/passwd",
        fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n"),
    )?;
    io(
        "write /etc/group",
        fs::write(rootfs.join("etc/group"), "root:x:0:\n"),
    )?;

    let layer = dir.join("layer.tar");
    tar_dir(&rootfs, &layer)?;
    let layer_digest = sha256_file(&layer)?;
    let layer_size = io("stat the layer", fs::metadata(&layer))?.len();
    io(
        "name the layer",
        fs::rename(&layer, blobs.join(&layer_digest)),
    )?;

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    })
    .to_string();
    let config_digest = write_blob(&blobs, config.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_size,
        }],
    })
    .to_string();
    let manifest_digest = write_blob(&blobs, manifest.as_bytes())?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    })
    .to_string();
    io(
        "write index.json",
        fs::write(dir.join("layout/index.json"), index),
    )?;
    io(
        "write oci-layout",
        fs::write(
            dir.join("layout/oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        ),
    )?;
    let tar = dir.join("image.tar");
    tar_dir(&dir.join("layout"), &tar)?;
    Ok(tar)
}

/// Archives the contents of `src` into `dest`, reproducibly (sorted, owner 0, mtime 0).
fn tar_dir(src: &Path, dest: &Path) -> Result<(), ImageError> {
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(src)
        .arg("-cf")
        .arg(dest)
        .arg("."))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-image-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("scratch dir");
        d
    }

    #[test]
    fn image_layout_is_complete_and_reproducible() {
        if !Path::new(BUSYBOX).is_file() {
            moat_test_support::skip(format!(
                "{BUSYBOX} missing (apt-get install busybox-static)"
            ));
            return;
        }
        let (a, b) = (scratch("a"), scratch("b"));
        let ta = build_busybox_image(&a, "docker.io/library/x:t1").expect("build a");
        let tb = build_busybox_image(&b, "docker.io/library/x:t1").expect("build b");
        assert_eq!(
            sha256_file(&ta).expect("sha a"),
            sha256_file(&tb).expect("sha b"),
            "two builds differ"
        );
        let index: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(a.join("layout/index.json")).expect("index"))
                .expect("index json");
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["io.containerd.image.name"],
            "docker.io/library/x:t1"
        );
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "t1");
        // Every digest named points at a blob with that content.
        let digest = m["digest"].as_str().expect("digest");
        let blob = a
            .join("layout/blobs/sha256")
            .join(&digest["sha256:".len()..]);
        assert_eq!(sha256_file(&blob).expect("sha"), &digest["sha256:".len()..]);
        assert!(a.join("rootfs/bin/sh").is_symlink(), "no sh applet link");
        let _ = fs::remove_dir_all(a);
        let _ = fs::remove_dir_all(b);
    }
}
