//! virtio-balloon, for free page reporting only (`VIRTIO_BALLOON_F_REPORTING`): the guest hands
//! over ranges of memory it has had free for a while (2 MiB blocks on x86), and the device drops
//! them from the VMM's resident memory (`madvise(MADV_DONTNEED)` on the private anonymous
//! mapping: the host gets the pages back, the guest reads zeros if it ever looks before reusing
//! them, which it does not). This is how a pod's VM gives memory back after a container frees
//! it, without anyone driving a balloon.
//!
//! The inflate and deflate queues exist (the driver always sets them up) but the device never
//! asks to inflate (`num_pages` stays 0); what the guest puts on them is returned untouched.
//!
//! The guest is hostile: a reported range is honoured only when it lies page-aligned inside one
//! region of guest RAM; anything else is returned unused and logged. Dropping pages the guest
//! still uses can only corrupt the guest itself.

use event_manager::{EventOps, Events, MutEventSubscriber};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    device_type, drain_queue, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// `VIRTIO_BALLOON_F_REPORTING`: the reporting queue exists.
pub const F_REPORTING: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 32;
/// Inflate, deflate, reporting (the stats and free-page-hint queues are absent: their features
/// are not offered, and absent queues take no index).
const NUM_QUEUES: usize = 3;
const REPORTING_QUEUE: usize = 2;
const PAGE: u64 = 4096;
/// Size of the config space (`num_pages`, `actual`, `free_page_hint_cmd_id`, `poison_val`).
const CONFIG_LEN: usize = 16;

/// Counters of what the guest reported, readable from any thread (for the control socket's
/// metrics and the tests).
#[derive(Debug, Default)]
pub struct ReportingStats {
    /// Bytes dropped from the VMM's memory.
    pub bytes: AtomicU64,
    /// Ranges dropped.
    pub ranges: AtomicU64,
    /// Ranges refused (outside guest RAM, unaligned, or `madvise` failed).
    pub refused: AtomicU64,
}

/// The free-page-reporting balloon.
pub struct Balloon {
    evts: [EventFd; NUM_QUEUES],
    config: [u8; CONFIG_LEN],
    active: Option<ActivateContext>,
    stats: Arc<ReportingStats>,
}

impl Balloon {
    /// A new, inactive device.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evts: [
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            config: [0; CONFIG_LEN],
            active: None,
            stats: Arc::default(),
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<ReportingStats> {
        self.stats.clone()
    }

    /// Serves queue `index`: reported ranges are dropped, inflate/deflate pages returned as they
    /// are.
    pub fn process_queue(&mut self, index: usize) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = ctx.queues.get_mut(index) else {
            return;
        };
        let mem = ctx.mem.clone();
        let stats = &self.stats;
        drain_queue(queue, &mem, &ctx.irq, |chain| {
            if index != REPORTING_QUEUE {
                return 0;
            }
            for desc in chain {
                let (addr, len) = (desc.addr().0, u64::from(desc.len()));
                match discard(&mem, addr, len) {
                    Ok(()) => {
                        stats.bytes.fetch_add(len, Ordering::Relaxed);
                        stats.ranges.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(why) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        guest_warn!(
                            "virtio-balloon: reported range {addr:#x}+{len:#x} ignored: {why}"
                        );
                    }
                }
            }
            0
        });
    }
}

/// Drops `len` bytes of guest RAM at guest address `addr` from the host's memory.
fn discard(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), String> {
    if len == 0 || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return Err("not a whole number of pages".into());
    }
    super::discard_guest_range(mem, addr, len)
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The driver writes `actual` (bytes 4..8) and `poison_val` (12..16); keep them so they
        // read back, refuse anything else.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let end = start.saturating_add(data.len());
        if start < 4 || end > CONFIG_LEN || (start < 12 && end > 8) {
            guest_warn!(
                "virtio-balloon: ignoring {}-byte config write at {offset:#x}",
                data.len()
            );
            return;
        }
        self.config[start..end].copy_from_slice(data);
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // The transport hands over every queue; one the driver did not set up (the reporting
        // queue when it did not take the feature) is not ready and yields nothing.
        ctx.expect_queues(NUM_QUEUES)?;
        self.active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for Balloon {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(i) = super::fired_queue(&self.evts, &events) {
            self.process_queue(i);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        super::register_queue_events(&self.evts, ops, "virtio-balloon");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{resident, Driver};
    use crate::devices::virtio::IrqTrigger;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn reported_ranges_leave_the_host_and_bad_ones_are_refused() {
        let mut d = Driver::new(QUEUE_SIZE);
        let mut dev = Balloon::new().unwrap();
        assert_eq!(dev.features() & F_REPORTING, F_REPORTING);
        // Three queues: the reporting queue is the driver's third.
        let queues = vec![d.queue(), d.queue(), d.queue()];
        dev.activate(ActivateContext {
            mem: d.mem.clone(),
            queues,
            acked_features: VIRTIO_F_VERSION_1 | F_REPORTING,
            irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        let (at, len) = (0x40_0000u64, 0x20_0000usize);
        d.mem
            .write_slice(&vec![0xa5; len], GuestAddress(at))
            .unwrap();
        assert_eq!(resident(&d.mem, at, len), len);
        // One good range, one unaligned, one past guest memory (16 MiB).
        d.add_chain(&[
            (at, len as u32, true),
            (0x10_0001, 4096, true),
            (0x100_0000 - 4096, 8192, true),
        ]);
        dev.process_queue(REPORTING_QUEUE);
        assert_eq!(d.used_idx(), 1);
        assert_eq!(
            resident(&d.mem, at, len),
            0,
            "the reported range left the host"
        );
        let mut b = [0u8; 1];
        d.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        assert_eq!(b[0], 0, "dropped pages read as zeros");
        let s = dev.stats();
        assert_eq!(s.bytes.load(Ordering::Relaxed), len as u64);
        assert_eq!(
            (
                s.ranges.load(Ordering::Relaxed),
                s.refused.load(Ordering::Relaxed)
            ),
            (1, 2)
        );
    }

    #[test]
    fn config_keeps_actual_and_poison_and_refuses_the_rest() {
        let mut dev = Balloon::new().unwrap();
        dev.write_config(4, &7u32.to_le_bytes());
        dev.write_config(12, &0xaau32.to_le_bytes());
        dev.write_config(0, &99u32.to_le_bytes());
        dev.write_config(6, &[1, 2, 3, 4]);
        let mut cfg = [0u8; 16];
        dev.read_config(0, &mut cfg);
        assert_eq!(&cfg[0..4], &0u32.to_le_bytes(), "num_pages stays 0");
        assert_eq!(&cfg[4..8], &7u32.to_le_bytes());
        assert_eq!(&cfg[12..16], &0xaau32.to_le_bytes());
    }
}
