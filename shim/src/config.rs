//! Shim configuration: one TOML file that says which VMM, guest kernel and initramfs to boot and
//! how large each pod's microVM is. Every key is optional; without a file the defaults apply.
//!
//! Where the file is read from, first match wins: the runtime option `ConfigPath` (containerd's
//! `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.moat.options] ConfigPath = "…"`,
//! or `ctr run --runtime-config-path`), the environment variable `MOAT_CONFIG`, then
//! [`DEFAULT_CONFIG_PATH`]. A missing default file means "all defaults"; a missing file named
//! explicitly is an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration file read when nothing else is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/moat/config.toml";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the moat config {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a value of the wrong type.
    #[error("invalid moat config {path}: {source}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's error, which names the key.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid moat config {path}: {what}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// Which key and what is wrong with it.
        what: String,
    },
}

/// The shim's configuration (see docs/shim.md for every key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The `moat-vmm` binary. Default: next to the shim binary, else `/usr/local/bin/moat-vmm`.
    pub vmm: PathBuf,
    /// Uncompressed guest kernel (`vmlinux`).
    pub kernel: PathBuf,
    /// Guest initramfs with `moat-agent` as `/init`.
    pub initrd: PathBuf,
    /// vCPUs per pod VM (the minimum: a pod's CPU limit may ask for more).
    pub vcpus: u8,
    /// Guest memory per pod VM, MiB: the base, to which a pod's memory limit is added
    /// ([`crate::sizing`]).
    pub memory_mib: u32,
    /// The most vCPUs a pod VM may get (0: the host's CPUs).
    pub max_vcpus: u8,
    /// The most memory a pod VM may get, MiB (0: the host's memory).
    pub max_memory_mib: u32,
    /// Grow a running pod's VM when a container is added or updated with larger limits:
    /// memory through virtio-mem (up to `max_memory_mib`), vCPUs created at boot up to
    /// `max_vcpus` but brought online only as the pod asks ([`crate::resources`]). Off: the VM
    /// keeps its start size and a larger ask is refused.
    pub hotplug: bool,
    /// Extra guest kernel command line parameters.
    pub kernel_params: String,
    /// Verbose guest kernel console (drops `quiet`); the console is always saved to
    /// `<state_dir>/<namespace>/<sandbox>/console.log`.
    pub debug_console: bool,
    /// Shim log level: error, warn, info, debug, trace.
    pub log_level: String,
    /// Where per-pod state lives (sockets, console log, shared directory).
    pub state_dir: PathBuf,
    /// How long to wait for the guest agent after starting the VMM, seconds.
    pub boot_timeout_secs: u64,
    /// Run the jailed moat-vmm in its own user namespace (no capability in the host's). Turn
    /// off only on hosts that cannot create user namespaces (`user.max_user_namespaces=0`, an
    /// LSM policy): moat-vmm then keeps its file capabilities in the host's namespace.
    pub vmm_user_namespace: bool,
    /// Run moat-vmm in the pod's host cgroup (the sandbox's `cgroupsPath`), so the pod's limits
    /// and RuntimeClass overhead bound the VM on the host ([`crate::cgroup`]).
    pub sandbox_cgroup: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            vmm: default_vmm(),
            kernel: PathBuf::from("/usr/local/share/moat/vmlinux"),
            initrd: PathBuf::from("/usr/local/share/moat/initramfs.cpio"),
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplug: true,
            kernel_params: String::new(),
            debug_console: false,
            log_level: "info".into(),
            state_dir: PathBuf::from("/run/moat"),
            boot_timeout_secs: 120,
            vmm_user_namespace: true,
            sandbox_cgroup: true,
        }
    }
}

fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("moat-vmm")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/moat-vmm"))
}

impl Config {
    /// Reads the configuration: `explicit` (the runtime option) if given, else `MOAT_CONFIG`,
    /// else the default path (whose absence means all defaults).
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let env = std::env::var_os("MOAT_CONFIG").map(PathBuf::from);
        match explicit.map(Path::to_path_buf).or(env) {
            Some(path) => Self::from_file(&path),
            None => {
                let path = Path::new(DEFAULT_CONFIG_PATH);
                if path.exists() {
                    Self::from_file(path)
                } else {
                    Ok(Self::default())
                }
            }
        }
    }

    /// Reads and validates one file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        let invalid = |what: &str| ConfigError::Invalid {
            path: path.to_owned(),
            what: what.to_owned(),
        };
        // The shim runs in a directory of containerd's choosing: a relative path would be
        // resolved against it, never against where the file was written.
        for (key, value) in [
            ("vmm", &config.vmm),
            ("kernel", &config.kernel),
            ("initrd", &config.initrd),
            ("state_dir", &config.state_dir),
        ] {
            if !value.is_absolute() {
                return Err(invalid(&format!(
                    "{key} must be an absolute path, not {}",
                    value.display()
                )));
            }
        }
        if config.vcpus == 0 {
            return Err(invalid("vcpus must be at least 1"));
        }
        if config.memory_mib < 64 {
            return Err(invalid("memory_mib must be at least 64"));
        }
        if config.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs must be at least 1"));
        }
        if !matches!(
            config.log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(invalid(
                "log_level must be one of error, warn, info, debug, trace",
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn keys_override_defaults() {
        let c = Config::parse(
            "vcpus = 2\nmemory_mib = 512\nkernel = \"/k\"\nlog_level = \"debug\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.log_level, "debug");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let err = Config::parse("vcpu = 2\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("vcpu"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        for bad in [
            "vcpus = 0",
            "memory_mib = 1",
            "log_level = \"loud\"",
            "vcpus = \"x\"",
            "vmm = \"target/debug/moat-vmm\"",
            "kernel = \"vmlinux\"",
            "initrd = \"./initramfs.cpio\"",
            "state_dir = \"run\"",
        ] {
            assert!(Config::parse(bad, Path::new("x.toml")).is_err(), "{bad}");
        }
    }

    /// `config/moat.toml` is what `scripts/install` puts at /etc/moat/config.toml; it claims
    /// to spell out the defaults, so it must parse to exactly them.
    #[test]
    fn shipped_config_file_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/moat.toml");
        let shipped = Config::from_file(&path).unwrap();
        let defaults = Config {
            vmm: PathBuf::from("/usr/local/bin/moat-vmm"),
            ..Config::default()
        };
        assert_eq!(shipped, defaults);
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/moat.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }
}
