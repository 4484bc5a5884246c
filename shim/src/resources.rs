//! A running pod's size: what each container asks for, the pod's total, and growing the VM to
//! it while the pod runs. The VM is created with room ([`crate::sizing::Room`]): a virtio-mem
//! region and vCPUs booted offline. When a container is added, or updated with larger limits,
//! the pod's total is sized again by the rule of [`crate::sizing`] and, if it is larger than
//! the VM, the VM grows **before** the container gets its new limit: memory by asking moat-vmm
//! to have the guest plug more of the region (waiting until it has), CPUs by asking the agent to
//! bring offline ones up.
//!
//! The pod's total is the larger of what the sandbox asked for at start (CRI's pod-level
//! annotations, which already sum the pod's containers) and the sum of its containers' own
//! limits. The VM never shrinks here: memory a container frees goes back to the host through
//! free page reporting (virtio-balloon), not by unplugging.
//!
//! What the guest reports (CPUs online, memory plugged) is only used to wait and to log; the
//! host bounds the pod through its cgroup whatever the guest does.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::ttrpc::context;
use tracing::{info, warn};

use crate::config::Config;
use crate::sizing::{self, PodResources, Room, SizingError, VmSize};
use crate::vmm_control::{self, VmmControlError};

/// How long the guest gets to plug the memory it was asked for (the software-KVM test host is
/// ~30× slower than hardware, where plugging 1 GiB takes well under a second).
pub const PLUG_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of the agent call that brings CPUs and memory online.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);

/// The VM could not grow to what the pod asks for.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// The pod asks for more than the host or the config allows.
    #[error(transparent)]
    Sizing(#[from] SizingError),
    /// More memory than the VM was created with room for.
    #[error(
        "the pod now needs a {asked} MiB VM, but this pod's VM can grow to {limit} MiB only \
         (hotplug is off in the moat config, or max_memory_mib was lower when the pod started)"
    )]
    NoMemoryRoom {
        /// VM size asked, MiB.
        asked: u32,
        /// What the VM can reach, MiB.
        limit: u32,
    },
    /// More vCPUs than the VM was created with.
    #[error(
        "the pod now needs {asked} vCPUs, but this pod's VM has {limit} (hotplug is off in the \
         moat config, or max_vcpus was lower when the pod started)"
    )]
    NoCpuRoom {
        /// vCPUs asked.
        asked: u8,
        /// vCPUs the VM has.
        limit: u8,
    },
    /// moat-vmm refused or could not be reached.
    #[error("growing the VM's memory: {0}")]
    Vmm(#[from] VmmControlError),
    /// The guest did not plug what it was asked to in time.
    #[error(
        "the guest plugged {plugged} of {asked} MiB of hotplug memory within {:?} (does the \
         guest kernel have CONFIG_VIRTIO_MEM?)",
        PLUG_TIMEOUT
    )]
    NotPlugged {
        /// Hotplug memory asked, MiB.
        asked: u64,
        /// Plugged when the wait ended, MiB.
        plugged: u64,
    },
    /// The agent could not bring CPUs or memory online.
    #[error("bringing CPUs and memory online in the guest: {0}")]
    Online(#[source] moat_protocol::ttrpc::Error),
}

struct State {
    pod: PodResources,
    containers: HashMap<String, PodResources>,
    current: VmSize,
}

/// One pod VM's size, and the means to grow it.
pub struct PodGrowth {
    config: Config,
    pod_id: String,
    api_sock: PathBuf,
    boot: VmSize,
    room: Room,
    state: tokio::sync::Mutex<State>,
}

/// The pod's total: the larger of the pod's own ask and the sum of its containers' (CPU as
/// quota per 100 ms period).
pub fn total<'a>(
    pod: &PodResources,
    containers: impl Iterator<Item = &'a PodResources>,
) -> PodResources {
    let (mut mem, mut cpu) = (0u64, 0u64);
    for c in containers {
        mem = mem.saturating_add(c.memory_bytes.unwrap_or(0));
        cpu = cpu.saturating_add(
            c.cpu
                .map_or(0, |(q, p)| q.saturating_mul(100_000) / p.max(1)),
        );
    }
    let pod_cpu = pod
        .cpu
        .map_or(0, |(q, p)| q.saturating_mul(100_000) / p.max(1));
    let mem = mem.max(pod.memory_bytes.unwrap_or(0));
    let cpu = cpu.max(pod_cpu);
    PodResources {
        memory_bytes: (mem > 0).then_some(mem),
        cpu: (cpu > 0).then_some((cpu, 100_000)),
    }
}

impl PodGrowth {
    /// The size of pod `pod_id`, booted at `boot` with `room` to grow into; `pod` is what the
    /// pod asked for at start.
    pub fn new(
        config: Config,
        pod_id: &str,
        api_sock: PathBuf,
        boot: VmSize,
        room: Room,
        pod: PodResources,
    ) -> Self {
        Self {
            config,
            pod_id: pod_id.to_owned(),
            api_sock,
            boot,
            room,
            state: tokio::sync::Mutex::new(State {
                pod,
                containers: HashMap::new(),
                current: boot,
            }),
        }
    }

    /// Records what container `id` asks for (`None`: it is gone; a limit left out: unchanged)
    /// and grows the VM when the pod's total needs more than it has. Returns the VM's size
    /// afterwards. An ask the VM cannot grow to is refused and forgotten.
    pub async fn set(
        &self,
        agent: &AgentClient,
        id: &str,
        res: Option<PodResources>,
    ) -> Result<VmSize, GrowError> {
        let mut st = self.state.lock().await;
        let before = (st.pod, st.containers.get(id).copied());
        // An ask that leaves a limit out (an Update of the CPU only) keeps the one recorded.
        let merge = |r: PodResources, old: Option<PodResources>| PodResources {
            memory_bytes: r.memory_bytes.or(old.and_then(|o| o.memory_bytes)),
            cpu: r.cpu.or(old.and_then(|o| o.cpu)),
        };
        match (res, id == self.pod_id) {
            (Some(r), true) => st.pod = merge(r, Some(before.0)),
            (Some(r), false) => {
                st.containers.insert(id.to_owned(), merge(r, before.1));
            }
            (None, _) => {
                st.containers.remove(id);
            }
        }
        let result = self.grow(agent, &mut st).await;
        if result.is_err() {
            // The ask was refused: forget it, so the next one is sized without it.
            st.pod = before.0;
            match before.1 {
                Some(r) => st.containers.insert(id.to_owned(), r),
                None => st.containers.remove(id),
            };
        }
        result
    }

    async fn grow(&self, agent: &AgentClient, st: &mut State) -> Result<VmSize, GrowError> {
        let asked = total(&st.pod, st.containers.values());
        let want = sizing::size(&self.config, &asked, sizing::host_limits())?;
        let cur = st.current;
        let target = VmSize {
            vcpus: want.vcpus.max(cur.vcpus),
            memory_mib: want.memory_mib.max(cur.memory_mib),
        };
        if target == cur {
            return Ok(cur);
        }
        if target.vcpus > self.room.max_vcpus {
            return Err(GrowError::NoCpuRoom {
                asked: target.vcpus,
                limit: self.room.max_vcpus,
            });
        }
        let limit = self.boot.memory_mib.saturating_add(self.room.hotplug_mib);
        if target.memory_mib > limit {
            return Err(GrowError::NoMemoryRoom {
                asked: target.memory_mib,
                limit,
            });
        }
        if target.memory_mib > cur.memory_mib {
            // virtio-mem plugs in 2 MiB blocks.
            let hotplug = u64::from(target.memory_mib - self.boot.memory_mib).next_multiple_of(2);
            vmm_control::resize_memory(&self.api_sock, hotplug).await?;
            self.wait_plugged(hotplug).await?;
        }
        let mut req = pb::OnlineResourcesRequest::new();
        req.vcpus = u32::from(target.vcpus);
        let ctx = context::with_timeout(ONLINE_TIMEOUT.as_nanos() as i64);
        let r = agent
            .online_resources(ctx, &req)
            .await
            .map_err(GrowError::Online)?;
        if r.online_cpus < req.vcpus {
            warn!(
                "pod {}: the guest has {} CPUs online, {} asked",
                self.pod_id, r.online_cpus, req.vcpus
            );
        }
        info!(
            "pod {}: VM grown from {} vCPUs / {} MiB to {} vCPUs / {} MiB (guest: {} CPUs online, MemTotal {} MiB)",
            self.pod_id,
            cur.vcpus,
            cur.memory_mib,
            target.vcpus,
            target.memory_mib,
            r.online_cpus,
            r.mem_total_bytes >> 20
        );
        st.current = target;
        Ok(target)
    }

    /// Polls moat-vmm until the guest has plugged `mib` MiB (bounded by [`PLUG_TIMEOUT`]).
    async fn wait_plugged(&self, mib: u64) -> Result<(), GrowError> {
        let deadline = Instant::now() + PLUG_TIMEOUT;
        loop {
            let plugged = vmm_control::status(&self.api_sock)
                .await?
                .plugged_mib
                .unwrap_or(0);
            if plugged >= mib {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(GrowError::NotPlugged {
                    asked: mib,
                    plugged,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(mem_mib: u64, cpu_millis: u64) -> PodResources {
        PodResources {
            memory_bytes: (mem_mib > 0).then_some(mem_mib << 20),
            cpu: (cpu_millis > 0).then_some((cpu_millis * 100, 100_000)),
        }
    }

    #[test]
    fn the_total_is_the_pod_ask_or_the_sum_of_the_containers() {
        let pod = r(1024, 2000);
        // Containers within the pod's own ask: the pod's.
        assert_eq!(
            total(&pod, [r(512, 500), r(256, 500)].iter()),
            r(1024, 2000)
        );
        // Beyond it: the sum.
        assert_eq!(
            total(&pod, [r(1024, 1500), r(512, 1000)].iter()),
            r(1536, 2500)
        );
        // Periods other than 100 ms count by their ratio; no limits anywhere: none.
        let odd = PodResources {
            memory_bytes: None,
            cpu: Some((50_000, 50_000)),
        };
        assert_eq!(total(&PodResources::default(), [odd].iter()), r(0, 1000));
        assert_eq!(
            total(&PodResources::default(), std::iter::empty()),
            PodResources::default()
        );
    }
}
