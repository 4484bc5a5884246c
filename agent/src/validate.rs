//! Checks of the names and relative paths the shim sends besides OCI documents: sandbox,
//! container and exec ids, shared-mount names, virtio-fs tags, and rootfs paths relative to a
//! share or a block device. (OCI specs and processes are checked by `spec`.)

use std::path::{Component, Path};

use crate::error::{AgentError, Result};

/// Checks that `s` (a `kind`, e.g. "container id") is 1-128 characters of `[A-Za-z0-9_.-]`
/// and not `.` or `..`, so it can name a directory or cgroup.
pub fn check_name(kind: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s != "."
        && s != "..";
    if ok {
        Ok(())
    } else {
        Err(AgentError::InvalidArgument(format!(
            "{kind} {s:?} must be 1-128 characters of [A-Za-z0-9_.-]"
        )))
    }
}

/// Checks that `p` (the request's `field`) is relative, without `..` and without NUL.
pub fn check_rel(field: &str, p: &str) -> Result<()> {
    let path = Path::new(p);
    if path.is_absolute()
        || path.components().any(|c| matches!(c, Component::ParentDir))
        || p.contains('\0')
    {
        return Err(AgentError::InvalidArgument(format!(
            "{field} {p:?} must be relative without \"..\""
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_relative_paths() {
        assert!(check_name("id", "c1.a_b-2").is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(129)] {
            let e = check_name("container id", bad).unwrap_err().to_string();
            assert!(e.contains("container id"), "{e}");
        }
        assert!(check_rel("path", "rootfs/sub").is_ok());
        for bad in ["/abs", "a/../b", "..", "a\0b"] {
            assert!(check_rel("path", bad).is_err(), "{bad:?}");
        }
    }
}
