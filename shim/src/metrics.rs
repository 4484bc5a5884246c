//! Container statistics for containerd's `Stats` (what `ctr task metrics` and the kubelet read):
//! the agent's cgroup v2 numbers mapped onto `io.containerd.cgroups.v2.Metrics`.

use containerd_shim_protos::cgroups_v2::metrics as cg2;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use moat_protocol::agent as pb;

/// The `type_url` containerd decodes cgroup v2 metrics by.
pub const CGROUP_V2_METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// The agent's statistics of a container as the `Any` containerd's `StatsResponse` carries.
pub fn to_any(
    s: &pb::StatsContainerResponse,
) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any {
        type_url: CGROUP_V2_METRICS_TYPE.to_owned(),
        value: to_cgroup_v2_metrics(s).write_to_bytes()?,
        ..Default::default()
    })
}

/// Maps the agent's cgroup v2 numbers onto containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn to_cgroup_v2_metrics(s: &pb::StatsContainerResponse) -> cg2::Metrics {
    let mut m = cg2::Metrics::new();
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(cg2::PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if let Some(c) = s.cpu.as_ref() {
        m.cpu = MessageField::some(cg2::CPUStat {
            usage_usec: c.usage_usec,
            user_usec: c.user_usec,
            system_usec: c.system_usec,
            nr_periods: c.nr_periods,
            nr_throttled: c.nr_throttled,
            throttled_usec: c.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        m.memory = MessageField::some(cg2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            max_usage: mem.peak_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        });
        m.memory_events = MessageField::some(cg2::MemoryEvents {
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(io) = s.io.as_ref() {
        m.io = MessageField::some(cg2::IOStat {
            usage: vec![cg2::IOEntry {
                rbytes: io.read_bytes,
                wbytes: io.write_bytes,
                rios: io.read_ios,
                wios: io.write_ios,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_map_to_cgroup_v2_metrics() {
        let s = pb::StatsContainerResponse {
            pids: Some(pb::PidsStats {
                current: 3,
                limit: 10,
                ..Default::default()
            })
            .into(),
            memory: Some(pb::MemoryStats {
                usage_bytes: 4096,
                oom_kill_events: 1,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = to_cgroup_v2_metrics(&s);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.pids.limit, 10);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert!(m.cpu.is_none());
    }
}
