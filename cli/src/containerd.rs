//! The configuration of a private containerd: one started for a while by `moat demo` (when no
//! containerd answers) or by the E2E trials, with its own root, state and socket so that the
//! system's containerd data is never touched, and the CRI plugin off (neither needs Kubernetes).
//! This module owns the text of that `containerd.toml`; starting and stopping the daemon stays
//! with each caller.

use std::path::Path;

/// The plugin id of containerd's CRI plugin, which a private containerd leaves off.
const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";

/// Renders a containerd config (format version 2) for a private containerd: data under `root`,
/// runtime state under `state`, the gRPC API on the Unix socket `address` and the ttrpc API on
/// `<address>.ttrpc`, the CRI plugin disabled. Pass it to `containerd --config FILE`.
///
/// The paths are written as they are (no TOML escaping), so they must not contain `"` or `\`;
/// scratch directories under the temporary directory do not.
pub fn private_config(root: &Path, state: &Path, address: &str) -> String {
    format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
         disabled_plugins = [\"{CRI_PLUGIN}\"]\n\
         [grpc]\n  address = \"{address}\"\n[ttrpc]\n  address = \"{address}.ttrpc\"\n",
        root = root.display(),
        state = state.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_private_paths_sockets_and_no_cri() {
        let text = private_config(
            Path::new("/tmp/x/root"),
            Path::new("/tmp/x/state"),
            "/tmp/x/containerd.sock",
        );
        let config: toml::Table = text.parse().expect("the config is valid TOML");
        let get = |table: &str, key: &str| {
            config[table]
                .get(key)
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
        };
        assert_eq!(config["version"].as_integer(), Some(2));
        assert_eq!(config["root"].as_str(), Some("/tmp/x/root"));
        assert_eq!(config["state"].as_str(), Some("/tmp/x/state"));
        assert_eq!(
            config["disabled_plugins"].as_array().map(Vec::as_slice),
            Some(&[toml::Value::from("io.containerd.grpc.v1.cri")][..])
        );
        assert_eq!(
            get("grpc", "address").as_deref(),
            Some("/tmp/x/containerd.sock")
        );
        assert_eq!(
            get("ttrpc", "address").as_deref(),
            Some("/tmp/x/containerd.sock.ttrpc")
        );
    }
}
