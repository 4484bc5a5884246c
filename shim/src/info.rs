//! `containerd-shim-moat-v2 -info`: what containerd 2.x asks every shim about its runtime
//! before it uses it (a `containerd.types.RuntimeInfo` on standard output, with the OCI
//! runtime-spec "features" document as JSON in `features`).
//!
//! The features say what the guest agent implements, no more: containerd uses them to decide,
//! for example, whether a pod's recursive read-only mounts (`rro`) or user-namespaced pods
//! (`idmap`) can be honoured, and refuses or falls back where they are not listed.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The type URL containerd expects for the features document.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The OCI features document of moat's guest agent.
pub fn features() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        // `rro`: the shim makes every mount below such a bind read-only on the host.
        "mountOptions": ["ro", "rw", "bind", "rbind", "rro", "nosuid", "nodev", "noexec"],
        "linux": {
            // No user namespaces inside the guest (yet): not listed.
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {"enabled": true},
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
            "mountExtensions": {"idmap": {"enabled": false}}
        },
        "annotations": {
            "io.github.moat.runtime": "microVM per pod (moat-vmm)"
        }
    })
}

/// The `RuntimeInfo` message, encoded.
pub fn runtime_info() -> Result<Vec<u8>, containerd_shim_protos::protobuf::Error> {
    let info = RuntimeInfo {
        name: "io.containerd.moat.v2".to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        }),
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_owned(),
            value: features().to_string().into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    info.write_to_bytes()
}

/// Whether the command line asks for `-info` (Go flag syntax: one or two dashes).
pub fn requested<I: IntoIterator<Item = String>>(args: I) -> bool {
    args.into_iter()
        .skip(1)
        .any(|a| a == "-info" || a == "--info")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_decodes_as_runtime_info_with_json_features() {
        let bytes = runtime_info().unwrap();
        let info = RuntimeInfo::parse_from_bytes(&bytes).unwrap();
        assert_eq!(info.name, "io.containerd.moat.v2");
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let f: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        assert_eq!(f["linux"]["cgroup"]["v2"], true);
        let opts = f["mountOptions"].as_array().unwrap();
        assert!(opts.iter().any(|o| o == "rro"), "{opts:?}");
    }

    #[test]
    fn only_the_info_flag_asks() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(requested(args(&["shim", "-info"])));
        assert!(requested(args(&["shim", "--info"])));
        assert!(!requested(args(&["shim", "-namespace", "k8s.io", "start"])));
        assert!(!requested(args(&["-info"])), "argv[0] is not a flag");
    }
}
