//! Validation of untrusted OCI input (runtime spec, exec process, rootfs
//! paths) before anything is created, and the path resolution used when
//! mounting inside a rootfs: every path stays inside the rootfs, `..` is
//! refused, and symlinks are followed relative to the rootfs and refused
//! when they climb out of it.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};

/// Symlinks followed at most while resolving one path.
const MAX_SYMLINKS: u32 = 40;

/// Errors in an OCI spec or process.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The JSON did not parse as an OCI document.
    #[error("invalid OCI {what}: {source}")]
    Parse {
        /// Which document.
        what: &'static str,
        /// Parser error.
        #[source]
        source: serde_json::Error,
    },
    /// A field holds a value the agent refuses.
    #[error("invalid OCI spec: {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: String,
        /// Why.
        reason: String,
    },
    /// A feature the agent does not implement.
    #[error("unsupported OCI spec feature: {0}")]
    Unsupported(String),
    /// A path resolved outside the rootfs.
    #[error("path {path:?} escapes the container rootfs {root:?}{via}")]
    Escape {
        /// The rootfs.
        root: PathBuf,
        /// The path asked for.
        path: String,
        /// Which symlink led out, if any.
        via: String,
    },
    /// Filesystem error while resolving a path.
    #[error("resolving {path:?} in {root:?}: {source}")]
    Resolve {
        /// The rootfs.
        root: PathBuf,
        /// The path asked for.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Checks that `p` is absolute and has no `..` component.
pub fn check_abs_path(field: &str, p: &str) -> Result<(), SpecError> {
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(invalid(field, format!("{p:?} is not an absolute path")));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(field, format!("{p:?} contains \"..\"")));
    }
    if p.contains('\0') {
        return Err(invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

/// Parses and validates a runtime spec (config.json bytes).
pub fn parse_spec(bytes: &[u8]) -> Result<Spec, SpecError> {
    let spec: Spec = serde_json::from_slice(bytes).map_err(|source| SpecError::Parse {
        what: "runtime spec",
        source,
    })?;
    validate_spec(&spec)?;
    Ok(spec)
}

/// Parses and validates an exec'd process (the `process` object JSON).
pub fn parse_process(bytes: &[u8]) -> Result<Process, SpecError> {
    let p: Process = serde_json::from_slice(bytes).map_err(|source| SpecError::Parse {
        what: "process",
        source,
    })?;
    validate_process("process", &p)?;
    Ok(p)
}

/// Validates a process object.
pub fn validate_process(field: &str, p: &Process) -> Result<(), SpecError> {
    match p.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(invalid(format!("{field}.args"), "must name a program")),
    }
    for a in p.args().iter().flatten().chain(p.env().iter().flatten()) {
        if a.contains('\0') {
            return Err(invalid(format!("{field}.args/env"), "contains a NUL byte"));
        }
    }
    let cwd = p.cwd().to_string_lossy();
    check_abs_path(&format!("{field}.cwd"), &cwd)?;
    if p.apparmor_profile().as_ref().is_some_and(|s| !s.is_empty()) {
        tracing::warn!("{field}.apparmorProfile ignored: no AppArmor in the guest");
    }
    Ok(())
}

/// Validates a whole spec.
pub fn validate_spec(spec: &Spec) -> Result<(), SpecError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("process", "missing"))?;
    validate_process("process", process)?;
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let dest = m.destination().to_string_lossy();
        check_abs_path(&format!("mounts[{i}].destination"), &dest)?;
        if dest == "/" {
            return Err(invalid(
                format!("mounts[{i}].destination"),
                "cannot mount over the root",
            ));
        }
        let typ = m.typ().as_deref().unwrap_or("bind");
        let is_bind = typ == "bind"
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if is_bind {
            let src = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            check_abs_path(&format!("mounts[{i}].source"), &src)?;
        }
    }
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().iter().flatten() {
            match ns.typ() {
                LinuxNamespaceType::User => {
                    return Err(SpecError::Unsupported("user namespaces".into()))
                }
                LinuxNamespaceType::Time => {
                    return Err(SpecError::Unsupported("time namespaces".into()))
                }
                _ => {}
            }
        }
        if let Some(r) = linux.resources() {
            validate_resources("linux.resources", r)?;
        }
        for (i, p) in linux.masked_paths().iter().flatten().enumerate() {
            check_abs_path(&format!("linux.maskedPaths[{i}]"), p)?;
        }
        for (i, p) in linux.readonly_paths().iter().flatten().enumerate() {
            check_abs_path(&format!("linux.readonlyPaths[{i}]"), p)?;
        }
        for (i, d) in linux.devices().iter().flatten().enumerate() {
            let p = d.path().to_string_lossy();
            check_abs_path(&format!("linux.devices[{i}].path"), &p)?;
            if !p.starts_with("/dev/") {
                return Err(invalid(
                    format!("linux.devices[{i}].path"),
                    format!("{p:?} is not under /dev"),
                ));
            }
        }
        for k in linux.sysctl().iter().flat_map(|m| m.keys()) {
            if k.is_empty() || k.contains('/') || k.split('.').any(|c| c.is_empty() || c == "..") {
                return Err(invalid("linux.sysctl", format!("bad key {k:?}")));
            }
        }
    }
    if let Some(h) = spec.hostname() {
        if h.len() > 64 || h.contains(['/', '\0']) {
            return Err(invalid(
                "hostname",
                format!("{h:?} is not a valid hostname"),
            ));
        }
    }
    Ok(())
}

/// Smallest memory limit accepted (the kernel needs a few pages to even
/// start a process; runc refuses below 6 MiB for the same reason).
pub const MIN_MEMORY_LIMIT: i64 = 6 << 20;

/// Validates OCI resources (at create and in UpdateContainer): `-1` means
/// unlimited (and a memory limit of 0 "not set"); other negative values and
/// memory limits too small to run anything are refused instead of being
/// silently turned into "max" or an instant OOM.
pub fn validate_resources(field: &str, r: &LinuxResources) -> Result<(), SpecError> {
    let neg = |name: &str, v: i64| {
        if v < -1 {
            Err(invalid(
                format!("{field}.{name}"),
                format!("{v} is negative (only -1, unlimited, is allowed)"),
            ))
        } else {
            Ok(())
        }
    };
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            neg("memory.limit", l)?;
            // 0 means "not set", as in runc.
            if (1..MIN_MEMORY_LIMIT).contains(&l) {
                return Err(invalid(
                    format!("{field}.memory.limit"),
                    format!("{l} bytes is below the minimum of {MIN_MEMORY_LIMIT}"),
                ));
            }
        }
        if let Some(v) = m.reservation() {
            neg("memory.reservation", v)?;
        }
        if let Some(v) = m.swap() {
            neg("memory.swap", v)?;
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(q) = c.quota() {
            neg("cpu.quota", q)?;
        }
        if c.period() == Some(0) {
            return Err(invalid(format!("{field}.cpu.period"), "must not be 0"));
        }
    }
    if let Some(p) = r.pids() {
        neg("pids.limit", p.limit())?;
    }
    Ok(())
}

/// Resolves `path` (absolute, as seen by the container) inside `root`,
/// following symlinks as the container would see them. Missing trailing
/// components are allowed (the result names where they would be). Fails if
/// a `..` or a symlink would leave `root`.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, SpecError> {
    let escape = |via: String| SpecError::Escape {
        root: root.to_owned(),
        path: path.to_owned(),
        via,
    };
    // Components still to walk, stack-wise (last = next).
    let mut pending: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(comp_name)
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if resolved.pop().is_none() {
                return Err(escape(String::new()));
            }
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(SpecError::Resolve {
                        root: root.to_owned(),
                        path: path.to_owned(),
                        source: std::io::Error::from_raw_os_error(libc::ELOOP),
                    });
                }
                let target =
                    std::fs::read_link(&candidate).map_err(|source| SpecError::Resolve {
                        root: root.to_owned(),
                        path: path.to_owned(),
                        source,
                    })?;
                if target.is_absolute() {
                    resolved.clear();
                }
                // Check lexically that the link stays in the root.
                let mut depth = resolved.len() as i64;
                for tc in target.components() {
                    match tc {
                        Component::ParentDir => depth -= 1,
                        Component::Normal(_) => depth += 1,
                        _ => {}
                    }
                    if depth < 0 {
                        return Err(escape(format!(
                            " (via symlink {} -> {})",
                            candidate.display(),
                            target.display()
                        )));
                    }
                }
                for tc in target.components().rev().filter_map(comp_name) {
                    pending.push(tc);
                }
            }
            Ok(_) => resolved.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => resolved.push(c),
            Err(source) => {
                return Err(SpecError::Resolve {
                    root: root.to_owned(),
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved.iter());
    Ok(out)
}

fn comp_name(c: Component<'_>) -> Option<std::ffi::OsString> {
    match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moat-spec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolves_inside_root() {
        let r = tmp("inside");
        std::fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("/usr/lib", r.join("lib")).unwrap();
        symlink("usr", r.join("u")).unwrap();
        assert_eq!(resolve_in_root(&r, "/lib/x").unwrap(), r.join("usr/lib/x"));
        assert_eq!(resolve_in_root(&r, "/u/lib").unwrap(), r.join("usr/lib"));
        assert_eq!(resolve_in_root(&r, "/new/dir").unwrap(), r.join("new/dir"));
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn refuses_escapes() {
        let r = tmp("escape");
        symlink("../../../etc", r.join("out")).unwrap();
        symlink("/../../etc", r.join("abs")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        for p in ["/out/passwd", "/abs", "/../etc"] {
            let e = resolve_in_root(&r, p).unwrap_err();
            assert!(matches!(e, SpecError::Escape { .. }), "{p}: {e}");
        }
        assert!(matches!(
            resolve_in_root(&r, "/loop").unwrap_err(),
            SpecError::Resolve { .. }
        ));
        std::fs::remove_dir_all(&r).unwrap();
    }

    fn spec_json(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"user":{{"uid":0,"gid":0}},"args":["/bin/sh"],"cwd":"/"}},"root":{{"path":"rootfs"}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn validates_specs() {
        parse_spec(&spec_json("")).unwrap();
        let bad = [
            (
                r#","mounts":[{"destination":"/a/../../x","type":"tmpfs","source":"tmpfs"}]"#,
                "\"..\"",
            ),
            (
                r#","mounts":[{"destination":"rel","type":"tmpfs","source":"tmpfs"}]"#,
                "absolute",
            ),
            (
                r#","mounts":[{"destination":"/x","type":"bind","source":"../etc","options":["rbind"]}]"#,
                "absolute",
            ),
            (
                r#","linux":{"namespaces":[{"type":"user"}]}"#,
                "user namespaces",
            ),
            (
                r#","linux":{"namespaces":[{"type":"bogus"}]}"#,
                "unknown variant",
            ),
            (r#","linux":{"maskedPaths":["/proc/../etc"]}"#, "\"..\""),
            (r#","linux":{"sysctl":{"../x":"1"}}"#, "bad key"),
            (
                r#","linux":{"resources":{"memory":{"limit":-2}}}"#,
                "linux.resources.memory.limit",
            ),
            (
                r#","linux":{"resources":{"memory":{"limit":4096}}}"#,
                "below the minimum",
            ),
            (
                r#","linux":{"resources":{"cpu":{"period":0}}}"#,
                "must not be 0",
            ),
        ];
        for ok in [
            r#","linux":{"resources":{"memory":{"limit":-1}}}"#,
            r#","linux":{"resources":{"memory":{"limit":0},"pids":{"limit":0}}}"#,
            r#","linux":{"resources":{"memory":{"limit":67108864}}}"#,
        ] {
            parse_spec(&spec_json(ok)).unwrap();
        }
        for (extra, want) in bad {
            let e = parse_spec(&spec_json(extra)).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = parse_spec(br#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#).unwrap_err();
        assert!(e.to_string().contains("process"), "{e}");
        let e = parse_process(br#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#).unwrap_err();
        assert!(e.to_string().contains("args"), "{e}");
    }
}
