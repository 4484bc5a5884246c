//! Counters for the control socket's `metrics` command (docs/vmm.md): each device bumps
//! relaxed atomics on its data path and shares them through an `Arc`; the VMM thread reads a
//! snapshot of all of them when asked. The node-level Prometheus exporter (`moat metrics
//! serve`) turns the answer into `moat_*` metric families.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Counters of one device, readable from any thread.
pub trait CounterSource: Send + Sync {
    /// Every counter by name (`rx_bytes`, `requests`, ...), as of now.
    fn snapshot(&self) -> BTreeMap<String, u64>;
}

/// Reads `counters` (name, atomic) into a map.
pub fn snapshot_of(counters: &[(&str, &AtomicU64)]) -> BTreeMap<String, u64> {
    counters
        .iter()
        .map(|(name, v)| ((*name).to_string(), v.load(Ordering::Relaxed)))
        .collect()
}

/// Adds `n` to `counter` (relaxed: counters order nothing).
pub fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// One device's entry in the VMM: its name, kind and counters.
#[derive(Clone)]
pub struct DeviceEntry {
    /// Device name (`net0`, `blk0`, `fs-rootfs`, `vsock0`, `balloon0`).
    pub device: String,
    /// Device kind (`net`, `blk`, `fs`, `vsock`, `balloon`, `mem`).
    pub kind: &'static str,
    /// Its counters.
    pub counters: Arc<dyn CounterSource>,
}

impl DeviceEntry {
    /// The entry's counters as of now.
    pub fn read(&self) -> DeviceMetrics {
        DeviceMetrics {
            device: self.device.clone(),
            kind: self.kind.to_string(),
            counters: self.counters.snapshot(),
        }
    }
}

/// One device's counters in a `metrics` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMetrics {
    /// Device name (`net0`, `blk0`, `fs-rootfs`, `vsock0`, `balloon0`, `mem0`).
    pub device: String,
    /// Device kind (`net`, `blk`, `fs`, `vsock`, `balloon`, `mem`).
    pub kind: String,
    /// Counter name → value. Names ending in `_bytes` count bytes; the rest count events,
    /// except `mem`'s, which are current sizes (gauges).
    pub counters: BTreeMap<String, u64>,
}

/// The `metrics` answer: the VM's shape and every device's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VmMetrics {
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Boot memory, bytes (without hotplug memory).
    pub mem_bytes: u64,
    /// Milliseconds from VMM start to the guest's boot marker, once seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<u64>,
    /// Per-device counters, in the order the devices were created.
    #[serde(default)]
    pub devices: Vec<DeviceMetrics>,
}

/// virtio-net counters.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frame bytes delivered to the guest (virtio-net header excluded).
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Frames read from the tap and dropped.
    pub rx_dropped: AtomicU64,
    /// Frame bytes written to the tap (virtio-net header excluded).
    pub tx_bytes: AtomicU64,
    /// Frames written to the tap.
    pub tx_packets: AtomicU64,
    /// Guest frames dropped.
    pub tx_dropped: AtomicU64,
}

impl CounterSource for NetCounters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        snapshot_of(&[
            ("rx_bytes", &self.rx_bytes),
            ("rx_packets", &self.rx_packets),
            ("rx_dropped", &self.rx_dropped),
            ("tx_bytes", &self.tx_bytes),
            ("tx_packets", &self.tx_packets),
            ("tx_dropped", &self.tx_dropped),
        ])
    }
}

/// virtio-blk counters.
#[derive(Debug, Default)]
pub struct BlkCounters {
    /// Bytes read for the guest.
    pub read_bytes: AtomicU64,
    /// Read requests served.
    pub read_requests: AtomicU64,
    /// Bytes written for the guest.
    pub write_bytes: AtomicU64,
    /// Write requests served.
    pub write_requests: AtomicU64,
    /// Flush requests served.
    pub flush_requests: AtomicU64,
    /// Requests answered with an error status (I/O error, unsupported, malformed).
    pub errors: AtomicU64,
}

impl CounterSource for BlkCounters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        snapshot_of(&[
            ("read_bytes", &self.read_bytes),
            ("read_requests", &self.read_requests),
            ("write_bytes", &self.write_bytes),
            ("write_requests", &self.write_requests),
            ("flush_requests", &self.flush_requests),
            ("errors", &self.errors),
        ])
    }
}

/// virtio-fs counters.
#[derive(Debug, Default)]
pub struct FsCounters {
    /// FUSE requests served (all opcodes).
    pub requests: AtomicU64,
    /// Requests that failed in the server or were malformed.
    pub errors: AtomicU64,
    /// Bytes written into guest reply buffers.
    pub reply_bytes: AtomicU64,
}

impl CounterSource for FsCounters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        snapshot_of(&[
            ("requests", &self.requests),
            ("errors", &self.errors),
            ("reply_bytes", &self.reply_bytes),
        ])
    }
}

/// virtio-vsock counters (payload bytes; packet headers excluded).
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets delivered to the guest (control packets included).
    pub rx_packets: AtomicU64,
    /// Payload bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Packets the guest sent (control packets included).
    pub tx_packets: AtomicU64,
}

impl CounterSource for VsockCounters {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        snapshot_of(&[
            ("rx_bytes", &self.rx_bytes),
            ("rx_packets", &self.rx_packets),
            ("tx_bytes", &self.tx_bytes),
            ("tx_packets", &self.tx_packets),
        ])
    }
}

impl CounterSource for crate::devices::virtio::balloon::ReportingStats {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        snapshot_of(&[
            ("reported_bytes", &self.bytes),
            ("reported_ranges", &self.ranges),
            ("refused_ranges", &self.refused),
        ])
    }
}

/// virtio-mem sizes (gauges, read under the device's lock): `region_bytes` (the hotplug
/// region), `requested_bytes` and `plugged_bytes`.
impl CounterSource for std::sync::Mutex<crate::devices::virtio::mem::VirtioMem> {
    fn snapshot(&self) -> BTreeMap<String, u64> {
        let dev = crate::devices::lock(self);
        let (requested, plugged) = dev.sizes();
        BTreeMap::from([
            ("region_bytes".to_string(), dev.region_size()),
            ("requested_bytes".to_string(), requested),
            ("plugged_bytes".to_string(), plugged),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_and_wire_format() {
        let c = NetCounters::default();
        bump(&c.rx_bytes, 1500);
        bump(&c.rx_bytes, 60);
        bump(&c.rx_packets, 2);
        let entry = DeviceEntry {
            device: "net0".into(),
            kind: "net",
            counters: Arc::new(c),
        };
        let m = entry.read();
        assert_eq!(m.counters["rx_bytes"], 1560);
        assert_eq!(m.counters["rx_packets"], 2);
        assert_eq!(m.counters["tx_bytes"], 0);
        let vm = VmMetrics {
            vcpus: 2,
            mem_bytes: 256 << 20,
            boot_ms: Some(120),
            devices: vec![m],
        };
        let text = serde_json::to_string(&vm).unwrap();
        assert!(text.starts_with(r#"{"vcpus":2,"mem_bytes":268435456,"boot_ms":120,"devices":[{"device":"net0","kind":"net","counters":{"rx_bytes":1560,"rx_dropped":0,"#), "{text}");
        assert_eq!(serde_json::from_str::<VmMetrics>(&text).unwrap(), vm);
    }
}
