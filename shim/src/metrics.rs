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
        let mut stat = cg2::MemoryStat {
            usage: mem.usage_bytes,
            usage_limit: mem.limit_bytes,
            max_usage: mem.peak_bytes,
            swap_usage: mem.swap_usage_bytes,
            swap_limit: mem.swap_limit_bytes,
            anon: mem.anon_bytes,
            file: mem.file_bytes,
            ..Default::default()
        };
        for (key, value) in &mem.stat {
            if let Some(field) = memory_stat_field(&mut stat, key) {
                *field = *value;
            }
        }
        m.memory = MessageField::some(stat);
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

/// The field of containerd's cgroup v2 `MemoryStat` that `memory.stat` key `key` fills; other
/// keys (the guest names them, so any string may come) are dropped.
fn memory_stat_field<'a>(m: &'a mut cg2::MemoryStat, key: &str) -> Option<&'a mut u64> {
    Some(match key {
        "anon" => &mut m.anon,
        "file" => &mut m.file,
        "kernel_stack" => &mut m.kernel_stack,
        "slab" => &mut m.slab,
        "sock" => &mut m.sock,
        "shmem" => &mut m.shmem,
        "file_mapped" => &mut m.file_mapped,
        "file_dirty" => &mut m.file_dirty,
        "file_writeback" => &mut m.file_writeback,
        "anon_thp" => &mut m.anon_thp,
        "inactive_anon" => &mut m.inactive_anon,
        "active_anon" => &mut m.active_anon,
        "inactive_file" => &mut m.inactive_file,
        "active_file" => &mut m.active_file,
        "unevictable" => &mut m.unevictable,
        "slab_reclaimable" => &mut m.slab_reclaimable,
        "slab_unreclaimable" => &mut m.slab_unreclaimable,
        "pgfault" => &mut m.pgfault,
        "pgmajfault" => &mut m.pgmajfault,
        "workingset_refault" | "workingset_refault_anon" => &mut m.workingset_refault,
        "workingset_activate" | "workingset_activate_anon" => &mut m.workingset_activate,
        "workingset_nodereclaim" => &mut m.workingset_nodereclaim,
        "pgrefill" => &mut m.pgrefill,
        "pgscan" => &mut m.pgscan,
        "pgsteal" => &mut m.pgsteal,
        "pgactivate" => &mut m.pgactivate,
        "pgdeactivate" => &mut m.pgdeactivate,
        "pglazyfree" => &mut m.pglazyfree,
        "pglazyfreed" => &mut m.pglazyfreed,
        "thp_fault_alloc" => &mut m.thp_fault_alloc,
        "thp_collapse_alloc" => &mut m.thp_collapse_alloc,
        _ => return None,
    })
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

    /// The kubelet's working set is usage - inactive_file: the fields must arrive.
    #[test]
    fn memory_stat_keys_fill_their_fields_and_unknown_ones_are_dropped() {
        let mut stat = std::collections::HashMap::new();
        for (k, v) in [
            ("inactive_file", 300u64),
            ("active_file", 200),
            ("shmem", 7),
            ("pgmajfault", 9),
            ("no_such_key", 1),
        ] {
            stat.insert(k.to_owned(), v);
        }
        let s = pb::StatsContainerResponse {
            memory: Some(pb::MemoryStats {
                usage_bytes: 1000,
                stat,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let m = to_cgroup_v2_metrics(&s);
        assert_eq!(
            (
                m.memory.inactive_file,
                m.memory.active_file,
                m.memory.shmem,
                m.memory.pgmajfault
            ),
            (300, 200, 7, 9)
        );
        assert_eq!(m.memory.usage, 1000);
    }
}
