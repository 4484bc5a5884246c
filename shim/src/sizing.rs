//! How large a pod's VM is: the configured base plus what the pod asks for.
//!
//! containerd's CRI plugin (1.6.7 and later) puts the pod's resources, which the kubelet sums
//! over the pod's containers (plus the RuntimeClass overhead), on the sandbox (pause)
//! container's spec as annotations: `io.kubernetes.cri.sandbox-memory` (bytes),
//! `-cpu-quota` and `-cpu-period` (CFS µs; quota 0 or -1 means no limit). A pod started
//! without CRI (`ctr run`) is one container: its own `linux.resources` limits count instead.
//! The rule, as Kata's static sizing:
//!
//! - memory: `memory_mib` of the config (the guest kernel, the agent, page cache) plus the
//!   pod's limit rounded up to MiB; the config's `memory_mib` alone without a limit;
//! - vCPUs: `ceil(quota / period)`, at least the config's `vcpus`.
//!
//! A pod that asks for more than `max_vcpus` / `max_memory_mib` (default: the host's CPUs and
//! memory) is refused with an error naming the limit. Guest memory is mapped `MAP_NORESERVE`:
//! the host pays only for what the guest touches.

use serde_json::Value;

use crate::config::Config;

/// Annotation: the pod's memory limit, bytes.
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
/// Annotation: the pod's CFS quota, µs per period.
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// Annotation: the pod's CFS period, µs.
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// A pod's size request is beyond what this host or the config allows.
#[derive(Debug, thiserror::Error)]
pub enum SizingError {
    /// More vCPUs than allowed.
    #[error(
        "the pod asks for {asked} vCPUs (its CPU limit), more than the {limit} allowed \
         (max_vcpus in the moat config, default: the host's CPUs)"
    )]
    TooManyVcpus {
        /// What the pod asks for.
        asked: u64,
        /// The limit.
        limit: u64,
    },
    /// More memory than allowed.
    #[error(
        "the pod's VM would need {asked} MiB (memory_mib {base} + its memory limit), more than \
         the {limit} MiB allowed (max_memory_mib in the moat config, default: the host's memory)"
    )]
    TooMuchMemory {
        /// The VM size the pod asks for.
        asked: u64,
        /// The configured base.
        base: u32,
        /// The limit.
        limit: u64,
    },
}

/// What the pod asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodResources {
    /// Memory limit, bytes (`None`: no limit).
    pub memory_bytes: Option<u64>,
    /// CPU limit as (quota, period) µs (`None`: no limit).
    pub cpu: Option<(u64, u64)>,
}

/// The VM a pod gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u32,
}

fn positive(v: Option<i64>) -> Option<u64> {
    v.filter(|n| *n > 0).and_then(|n| u64::try_from(n).ok())
}

impl PodResources {
    /// From the first container's spec: the CRI sandbox annotations, else (a pod without CRI)
    /// the container's own limits.
    pub fn from_spec(spec: &Value) -> Self {
        let ann = |key: &str| {
            spec.get("annotations")
                .and_then(|a| a.get(key))
                .and_then(Value::as_str)
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        let is_sandbox = spec
            .get("annotations")
            .and_then(|a| a.get(SANDBOX_MEMORY).or_else(|| a.get(SANDBOX_CPU_QUOTA)))
            .is_some();
        if is_sandbox {
            return Self {
                memory_bytes: positive(ann(SANDBOX_MEMORY)),
                cpu: positive(ann(SANDBOX_CPU_QUOTA))
                    .zip(positive(ann(SANDBOX_CPU_PERIOD)).or(Some(100_000))),
            };
        }
        spec.pointer("/linux/resources")
            .map(Self::from_linux_resources)
            .unwrap_or_default()
    }

    /// From OCI `LinuxResources` (a container's `linux.resources`, or an Update's): its memory
    /// limit and CPU quota (period 100 ms when not given).
    pub fn from_linux_resources(res: &Value) -> Self {
        let num = |p: &str| res.pointer(p).and_then(Value::as_i64);
        Self {
            memory_bytes: positive(num("/memory/limit")),
            cpu: positive(num("/cpu/quota")).zip(positive(num("/cpu/period")).or(Some(100_000))),
        }
    }
}

/// The host's CPUs and memory (MiB), the default limits.
pub fn host_limits() -> (u64, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX);
    (cpus, mem_mib)
}

/// `(max_vcpus, max_memory_mib)` under `config`, with `host` for limits it leaves at 0.
fn limits(config: &Config, host: (u64, u64)) -> (u64, u64) {
    let max_vcpus = match config.max_vcpus {
        0 => host.0,
        n => u64::from(n),
    }
    .min(32); // moat-vmm's limit
    let max_mib = match config.max_memory_mib {
        0 => host.1,
        n => u64::from(n),
    };
    (max_vcpus, max_mib)
}

/// Room a pod's VM is created with, to grow into while it runs ([`crate::resources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// vCPUs created (those beyond [`VmSize::vcpus`] boot offline).
    pub max_vcpus: u8,
    /// The virtio-mem region, MiB (a multiple of 128; 0: none).
    pub hotplug_mib: u32,
}

/// The room for a VM of `size` under `config` (none when `hotplug` is off).
pub fn room(config: &Config, size: &VmSize, host: (u64, u64)) -> Room {
    if !config.hotplug {
        return Room {
            max_vcpus: size.vcpus,
            hotplug_mib: 0,
        };
    }
    let (max_vcpus, max_mib) = limits(config, host);
    let hotplug = max_mib.saturating_sub(u64::from(size.memory_mib)) / 128 * 128;
    Room {
        max_vcpus: u8::try_from(max_vcpus).unwrap_or(u8::MAX).max(size.vcpus),
        hotplug_mib: u32::try_from(hotplug).unwrap_or(u32::MAX / 128 * 128),
    }
}

/// The VM for `res` under `config`, with `host` = ([`host_limits`]) for limits the config
/// leaves at 0.
pub fn size(config: &Config, res: &PodResources, host: (u64, u64)) -> Result<VmSize, SizingError> {
    let (max_vcpus, max_mib) = limits(config, host);
    let vcpus = match res.cpu {
        Some((quota, period)) => quota.div_ceil(period.max(1)),
        None => 0,
    }
    .max(u64::from(config.vcpus));
    if vcpus > max_vcpus {
        return Err(SizingError::TooManyVcpus {
            asked: vcpus,
            limit: max_vcpus,
        });
    }
    let extra = res.memory_bytes.map(|b| b.div_ceil(1 << 20)).unwrap_or(0);
    let memory = u64::from(config.memory_mib).saturating_add(extra);
    if memory > max_mib || u32::try_from(memory).is_err() {
        return Err(SizingError::TooMuchMemory {
            asked: memory,
            base: config.memory_mib,
            limit: max_mib,
        });
    }
    Ok(VmSize {
        vcpus: u8::try_from(vcpus).unwrap_or(u8::MAX),
        memory_mib: u32::try_from(memory).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const HOST: (u64, u64) = (8, 16384);

    #[test]
    fn cri_annotations_size_the_vm() {
        let spec = json!({"annotations": {
            SANDBOX_MEMORY: "1073741824", SANDBOX_CPU_QUOTA: "250000", SANDBOX_CPU_PERIOD: "100000"
        }});
        let res = PodResources::from_spec(&spec);
        assert_eq!(res.memory_bytes, Some(1 << 30));
        let s = size(&Config::default(), &res, HOST).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 3,
                memory_mib: 256 + 1024
            }
        );
    }

    #[test]
    fn no_limits_give_the_config_defaults() {
        // containerd writes "0" when the pod has no limit.
        let spec = json!({"annotations": {
            SANDBOX_MEMORY: "0", SANDBOX_CPU_QUOTA: "0", SANDBOX_CPU_PERIOD: "100000"
        }});
        let s = size(&Config::default(), &PodResources::from_spec(&spec), HOST).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        let s = size(
            &Config::default(),
            &PodResources::from_spec(&json!({})),
            HOST,
        )
        .unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        // A quota below one CPU still gets the configured minimum.
        let spec = json!({"annotations": {SANDBOX_CPU_QUOTA: "10000"}});
        let s = size(&Config::default(), &PodResources::from_spec(&spec), HOST).unwrap();
        assert_eq!(s.vcpus, 1);
    }

    #[test]
    fn a_pod_without_cri_counts_its_container_limits() {
        let spec = json!({"linux": {"resources": {
            "memory": {"limit": 536870912u64}, "cpu": {"quota": 200000, "period": 100000}
        }}});
        let s = size(&Config::default(), &PodResources::from_spec(&spec), HOST).unwrap();
        assert_eq!(
            s,
            VmSize {
                vcpus: 2,
                memory_mib: 256 + 512
            }
        );
    }

    #[test]
    fn room_to_grow_is_the_limit_in_128_mib_steps() {
        let size = VmSize {
            vcpus: 2,
            memory_mib: 300,
        };
        let r = room(&Config::default(), &size, HOST);
        assert_eq!(r.max_vcpus, 8);
        assert_eq!(r.hotplug_mib, (16384 - 300) / 128 * 128);
        let off = Config {
            hotplug: false,
            ..Config::default()
        };
        assert_eq!(
            room(&off, &size, HOST),
            Room {
                max_vcpus: 2,
                hotplug_mib: 0
            }
        );
        let tight = Config {
            max_memory_mib: 400,
            max_vcpus: 1,
            ..Config::default()
        };
        let r = room(&tight, &size, HOST);
        assert_eq!((r.max_vcpus, r.hotplug_mib), (2, 0));
    }

    #[test]
    fn too_large_pods_are_refused_naming_the_limit() {
        let spec =
            json!({"annotations": {SANDBOX_CPU_QUOTA: "900000", SANDBOX_CPU_PERIOD: "100000"}});
        let err = size(&Config::default(), &PodResources::from_spec(&spec), HOST).unwrap_err();
        assert!(
            err.to_string().contains("9 vCPUs") && err.to_string().contains("max_vcpus"),
            "{err}"
        );
        let spec = json!({"annotations": {SANDBOX_MEMORY: "34359738368"}});
        let err = size(&Config::default(), &PodResources::from_spec(&spec), HOST).unwrap_err();
        assert!(err.to_string().contains("max_memory_mib"), "{err}");
        let config = Config {
            max_memory_mib: 4096,
            ..Config::default()
        };
        let spec = json!({"annotations": {SANDBOX_MEMORY: "4294967296"}});
        let err = size(&config, &PodResources::from_spec(&spec), HOST).unwrap_err();
        assert!(err.to_string().contains("4096 MiB"), "{err}");
    }
}
