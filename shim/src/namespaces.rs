//! What a container's spec asks of namespaces and mount propagation, translated for a pod that
//! runs in its own VM — and refused where a VM cannot do it.
//!
//! CRI (containerd 1.6–2.x) expresses a pod's namespaces in the OCI specs it writes:
//! - the sandbox (pause) container has no `pid`, `ipc` or `network` entry in `linux.namespaces`
//!   when the pod asks for `hostPID`, `hostIPC` or `hostNetwork` (no entry: the runtime's own
//!   namespace, i.e. the host's); otherwise an entry without a path (a new namespace) or, for
//!   the network, the CNI netns path;
//! - every other container joins the sandbox's namespaces by path `/proc/<sandbox pid>/ns/…`,
//!   the pid namespace only when the pod shares it (`shareProcessNamespace`, or a target
//!   container's for ephemeral containers); without sharing its `pid` entry has no path;
//! - a Bidirectional volume gets mount option `rshared` and `linux.rootfsPropagation: rshared`.
//!
//! The sandbox pid containerd uses is the task pid the shim reported: the VM's (moat-vmm's), the
//! same for every container of the pod. Joining a namespace of a host process is impossible from
//! inside the VM, so [`check_vm_limits`] refuses a CRI spec that needs the host's namespaces or
//! propagation back to the host, and [`pid_namespace_owner`] turns a pid namespace path into the
//! container (in the guest) whose pid namespace to join. Specs without CRI annotations (`ctr
//! run`) are left as they are.

use serde_json::Value;

/// The CRI annotation (containerd 1.6 and 2.x) naming the pod's sandbox container: every
/// container of a pod carries it, and one shim serves the whole pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The CRI annotation that says whether a container is the pod's sandbox (`sandbox`) or one of
/// its containers (`container`).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// What a VM pod cannot do, or a pid namespace it cannot place.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The pod asks for one of the host's namespaces.
    #[error(
        "{setting}: moat runs each pod in its own VM, so a pod cannot share the host's {what} \
         namespace (the sandbox spec has no linux.namespaces entry of type {typ:?})"
    )]
    HostNamespace {
        /// The Kubernetes setting (`hostPID`, …).
        setting: &'static str,
        /// The namespace, in words.
        what: &'static str,
        /// The OCI namespace type.
        typ: &'static str,
    },
    /// A mount (or the rootfs) asks for propagation back to the host.
    #[error(
        "{field} is {value:?} (Bidirectional mount propagation): moat runs each pod in its own \
         VM, so mounts made inside the container cannot propagate back to the host"
    )]
    SharedPropagation {
        /// The spec field.
        field: String,
        /// Its value.
        value: String,
    },
    /// A pid namespace path that is not the pod's.
    #[error(
        "linux.namespaces: pid namespace path {path:?} is not the pod's ({expected:?}): moat runs \
         each pod in its own VM and can only share the pod's pid namespace"
    )]
    ForeignPidNamespace {
        /// The path in the spec.
        path: String,
        /// The pod's (the VM's) pid namespace path as containerd would write it.
        expected: String,
    },
    /// A container that shares the pod's pid namespace names no sandbox.
    #[error(
        "linux.namespaces: the pid namespace is the pod's, but the spec has no {SANDBOX_ID_ANNOTATION} annotation naming the pod's sandbox container"
    )]
    NoSandboxId,
}

/// Whether the spec was written by CRI (it names the container's type).
fn container_type(spec: &Value) -> Option<&str> {
    spec.get("annotations")?
        .get(CONTAINER_TYPE_ANNOTATION)?
        .as_str()
}

fn namespace<'a>(spec: &'a Value, typ: &str) -> Option<&'a Value> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(Value::as_str) == Some(typ))
}

fn is_shared(propagation: &str) -> bool {
    matches!(propagation, "shared" | "rshared")
}

/// Refuses a CRI spec that needs what a VM pod cannot give: the host's PID, IPC or network
/// namespace (checked on the sandbox container, where CRI expresses them) or mount propagation
/// back to the host (`rshared`/`shared` on a mount or the rootfs). Specs without CRI
/// annotations pass unchecked.
pub fn check_vm_limits(spec: &Value) -> Result<(), NamespaceError> {
    let Some(kind) = container_type(spec) else {
        return Ok(());
    };
    if kind == "sandbox" {
        for (typ, setting, what) in [
            ("pid", "hostPID", "PID"),
            ("ipc", "hostIPC", "IPC"),
            ("network", "hostNetwork", "network"),
        ] {
            if namespace(spec, typ).is_none() {
                return Err(NamespaceError::HostNamespace { setting, what, typ });
            }
        }
    }
    if let Some(p) = spec
        .pointer("/linux/rootfsPropagation")
        .and_then(Value::as_str)
    {
        if is_shared(p) {
            return Err(NamespaceError::SharedPropagation {
                field: "linux.rootfsPropagation".into(),
                value: p.to_owned(),
            });
        }
    }
    for (i, m) in spec
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let shared = m
            .get("options")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .find(|o| is_shared(o));
        if let Some(o) = shared {
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("");
            return Err(NamespaceError::SharedPropagation {
                field: format!("mounts[{i}] ({dest}) option"),
                value: o.to_owned(),
            });
        }
    }
    Ok(())
}

/// The container (in the guest) whose pid namespace a CRI container joins: the pod's sandbox
/// container when the spec's `pid` entry has a path, which must be the pod's
/// (`/proc/<vm_pid>/ns/pid`, the task pid the shim reported). `None`: a pid namespace of its own
/// (no path, no CRI annotation, or the sandbox container itself).
pub fn pid_namespace_owner(spec: &Value, vm_pid: u32) -> Result<Option<String>, NamespaceError> {
    if container_type(spec) != Some("container") {
        return Ok(None);
    }
    let Some(path) = namespace(spec, "pid")
        .and_then(|ns| ns.get("path"))
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
    else {
        return Ok(None);
    };
    let expected = format!("/proc/{vm_pid}/ns/pid");
    if path != expected {
        return Err(NamespaceError::ForeignPidNamespace {
            path: path.to_owned(),
            expected,
        });
    }
    spec.get("annotations")
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(|s| Some(s.to_owned()))
        .ok_or(NamespaceError::NoSandboxId)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cri(kind: &str, namespaces: Value) -> Value {
        json!({
            "annotations": {CONTAINER_TYPE_ANNOTATION: kind, SANDBOX_ID_ANNOTATION: "pod1"},
            "linux": {"namespaces": namespaces},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]
        })
    }

    fn pod_namespaces() -> Value {
        json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
               {"type": "network", "path": "/var/run/netns/cni-1"}])
    }

    #[test]
    fn host_namespaces_of_a_cri_sandbox_are_refused() {
        check_vm_limits(&cri("sandbox", pod_namespaces())).unwrap();
        for (typ, setting) in [
            ("pid", "hostPID"),
            ("ipc", "hostIPC"),
            ("network", "hostNetwork"),
        ] {
            let mut ns = pod_namespaces();
            ns.as_array_mut().unwrap().retain(|n| n["type"] != typ);
            let e = check_vm_limits(&cri("sandbox", ns.clone())).unwrap_err();
            let m = e.to_string();
            assert!(m.starts_with(setting), "{m}");
            assert!(m.contains("moat runs each pod in its own VM"), "{m}");
            // The same spec from `ctr run` (no CRI annotations) is left alone.
            check_vm_limits(&json!({"linux": {"namespaces": ns}})).unwrap();
        }
    }

    #[test]
    fn bidirectional_propagation_is_refused() {
        let mut s = cri("container", json!([{"type": "pid"}]));
        s["mounts"] = json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind", "rshared", "rw"]}
        ]);
        let m = check_vm_limits(&s).unwrap_err().to_string();
        assert!(
            m.contains("mounts[1] (/data)") && m.contains("\"rshared\""),
            "{m}"
        );
        s["mounts"][1]["options"] = json!(["rbind", "rslave"]);
        check_vm_limits(&s).unwrap();
        s["linux"]["rootfsPropagation"] = json!("rshared");
        let m = check_vm_limits(&s).unwrap_err().to_string();
        assert!(m.starts_with("linux.rootfsPropagation"), "{m}");
        s["annotations"] = json!({});
        check_vm_limits(&s).unwrap();
    }

    #[test]
    fn a_pod_pid_namespace_path_names_the_sandbox_container() {
        let shared = cri(
            "container",
            json!([{"type": "pid", "path": "/proc/77/ns/pid"}, {"type": "mount"}]),
        );
        assert_eq!(
            pid_namespace_owner(&shared, 77).unwrap().as_deref(),
            Some("pod1")
        );
        let m = pid_namespace_owner(&shared, 78).unwrap_err().to_string();
        assert!(m.contains("/proc/78/ns/pid"), "{m}");
        let own = cri("container", json!([{"type": "pid"}]));
        assert_eq!(pid_namespace_owner(&own, 77).unwrap(), None);
        let sandbox = cri(
            "sandbox",
            json!([{"type": "pid", "path": "/proc/77/ns/pid"}]),
        );
        assert_eq!(pid_namespace_owner(&sandbox, 77).unwrap(), None);
        let mut no_id = shared.clone();
        no_id["annotations"] = json!({CONTAINER_TYPE_ANNOTATION: "container"});
        assert!(matches!(
            pid_namespace_owner(&no_id, 77),
            Err(NamespaceError::NoSandboxId)
        ));
        let ctr = json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/77/ns/pid"}]}});
        assert_eq!(pid_namespace_owner(&ctr, 77).unwrap(), None);
    }
}
