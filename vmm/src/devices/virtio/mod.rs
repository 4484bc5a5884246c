//! Virtio devices and the virtio-mmio transport (virtio 1.x, "modern" register layout).
//!
//! A device implements [`VirtioDevice`] (identity, features, config space, activation) and,
//! separately, `event_manager::MutEventSubscriber` for its data path: the event loop thread
//! runs queue processing when a queue eventfd (an ioeventfd on the QueueNotify register)
//! or a backend fd becomes ready. The transport runs on the vCPU threads.

pub mod balloon;
pub mod blk;
pub mod fs;
pub mod fs_link;
pub mod fs_policy;
pub mod mem;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod tap;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type ids (virtio spec 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon (moat: free page reporting only).
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// Memory device (hot(un)plug).
    pub const MEM: u32 = 24;
    /// File system device.
    pub const FS: u32 = 26;
}

/// Interrupt status bit: a queue's used ring was updated.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, driver set up {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues in the activation request.
        got: usize,
    },
    /// The device backend could not be started.
    #[error("device backend: {what}: {err}")]
    Backend {
        /// What the device was doing.
        what: &'static str,
        /// The OS error.
        #[source]
        err: std::io::Error,
    },
}

/// The interrupt line of one virtio-mmio device: the InterruptStatus register and the irqfd.
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger raising `evt` (an irqfd registered with KVM).
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues, configured by the driver and validated.
    pub queues: Vec<Queue>,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    /// Interrupt line.
    pub irq: std::sync::Arc<IrqTrigger>,
}

impl ActivateContext {
    /// Fails activation unless the driver set up exactly `expected` queues.
    pub fn expect_queues(&self, expected: usize) -> Result<(), ActivateError> {
        if self.queues.len() == expected {
            Ok(())
        } else {
            Err(ActivateError::QueueCount {
                expected,
                got: self.queues.len(),
            })
        }
    }
}

/// The device side of a virtio device, as seen by the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads device config space at `offset`; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space (most devices have a read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        guest_warn!(
            "virtio type {}: ignoring {}-byte config write at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }
    /// Bumped by the device whenever it changes its config space by itself (the transport's
    /// ConfigGeneration adds it, so a driver reading a multi-word field sees a torn read).
    fn config_generation(&self) -> u32 {
        0
    }
    /// The queue eventfds, one per queue, signalled on QueueNotify.
    fn queue_events(&self) -> &[EventFd];
    /// Starts the data path.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the data path and forgets the queues (driver wrote 0 to Status).
    fn reset(&mut self);
}

/// Drops `len` bytes of guest memory at guest address `addr` from the host
/// (`MADV_DONTNEED`: the pages read as zeros afterwards). The range must lie inside one region.
pub fn discard_guest_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<(), String> {
    use vm_memory::{GuestAddress, GuestMemory};
    let count = usize::try_from(len).map_err(|_| "too long".to_owned())?;
    let slice = mem
        .get_slice(GuestAddress(addr), count)
        .map_err(|e| format!("not inside one region of guest memory: {e}"))?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    // SAFETY: `ptr..ptr + count` lies inside a private anonymous mapping of guest memory that
    // the VMM owns for its lifetime (get_slice checked the bounds); MADV_DONTNEED only replaces
    // its pages with zero-filled ones, which every user of guest memory must expect.
    let rc = unsafe { libc::madvise(ptr.cast(), count, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Copies the part of `config` at `offset` into `data` (out-of-range bytes stay zero).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Registers each queue's notification eventfd with the device's event loop (the `init` of a
/// device's `MutEventSubscriber`), with the queue's index as its token (the epoll data that
/// comes back in [`Events::data`]); `device` names it in the error log. A device registering
/// other descriptors gives them tokens from `evts.len()` on.
pub fn register_queue_events(evts: &[EventFd], ops: &mut EventOps, device: &str) {
    for (i, e) in evts.iter().enumerate() {
        let token = u32::try_from(i).expect("a device has few queues");
        if let Err(err) = ops.add(Events::with_data(e, token, EventSet::IN)) {
            tracing::error!("{device}: cannot register queue event: {err:?}");
        }
    }
}

/// The index of the queue whose notification fired, from the token of `events` (see
/// [`register_queue_events`]), its eventfd counter consumed (the `process` of a device's
/// `MutEventSubscriber`); `None` for a token that is not a queue index.
pub fn fired_queue(evts: &[EventFd], events: &Events) -> Option<usize> {
    let i = usize::try_from(events.data()).ok()?;
    let _ = evts.get(i)?.read();
    Some(i)
}

/// Returns each popped chain to the used ring with the length `handle` reports, then raises
/// the interrupt if anything was used. `handle` never fails: malformed chains are the
/// device's problem to report (length 0, error status), never a panic.
pub fn drain_queue<F>(queue: &mut Queue, mem: &GuestMemoryMmap, irq: &IrqTrigger, mut handle: F)
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = handle(chain);
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::error!("virtio: cannot return descriptor {head}: {e}");
        }
        used = true;
    }
    if used {
        irq.trigger(INT_VRING);
    }
}

/// Test helpers shared by the device tests: a driver-side view of a split queue in real
/// guest memory.
#[cfg(test)]
pub mod testing {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemory};

    /// Descriptor flags.
    pub const NEXT: u16 = 1;
    /// Device-writable descriptor.
    pub const WRITE: u16 = 2;

    /// Resident bytes of the `len` bytes of guest memory at `addr` (`mincore`): what the host
    /// pays for them.
    pub fn resident(mem: &GuestMemoryMmap, addr: u64, len: usize) -> usize {
        let slice = mem.get_slice(GuestAddress(addr), len).unwrap();
        let ptr = slice.ptr_guard_mut().as_ptr();
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `ptr..ptr + len` lies inside the guest memory mapping (get_slice checked it)
        // and `vec` has one byte per page of it.
        let rc = unsafe { libc::mincore(ptr.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|b| **b & 1 == 1).count() * 4096
    }

    /// A driver that owns one queue of `size` at fixed addresses in guest memory.
    pub struct Driver {
        /// Guest memory (1 MiB at 0).
        pub mem: GuestMemoryMmap,
        desc: u64,
        avail: u64,
        used: u64,
        size: u16,
        avail_idx: u16,
        next_desc: u16,
    }

    impl Driver {
        /// A queue at `base` in a fresh 16 MiB guest memory.
        pub fn new(size: u16) -> Self {
            Self::with_memory(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
                0x1000,
                size,
            )
        }

        /// A queue in `mem` with tables at `base`.
        pub fn with_memory(mem: GuestMemoryMmap, base: u64, size: u16) -> Self {
            Self {
                mem,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                size,
                avail_idx: 0,
                next_desc: 0,
            }
        }

        /// A device-side `Queue` configured like the driver's.
        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.set_desc_table_address(Some(self.desc as u32), Some(0));
            q.set_avail_ring_address(Some(self.avail as u32), Some(0));
            q.set_used_ring_address(Some(self.used as u32), Some(0));
            q.set_ready(true);
            q
        }

        /// Writes descriptor `index` directly (for malformed chains).
        pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(self.desc + u64::from(index) * 16);
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }

        /// Puts descriptor head `head` on the avail ring.
        pub fn publish(&mut self, head: u16) {
            let slot = GuestAddress(self.avail + 4 + u64::from(self.avail_idx % self.size) * 2);
            self.mem.write_obj(head, slot).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Adds a chain of `(addr, len, writable)` buffers and publishes it; returns the head.
        /// Descriptors are taken round the table, so a driver can send any number of chains
        /// as long as the device consumes them.
        pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, (addr, len, w)) in bufs.iter().enumerate() {
                let idx = self.next_desc;
                let last = i + 1 == bufs.len();
                let flags = if *w { WRITE } else { 0 } | if last { 0 } else { NEXT };
                let next = (idx + 1) % self.size;
                self.write_desc(idx, *addr, *len, flags, next);
                self.next_desc = next;
            }
            self.publish(head);
            head
        }

        /// Number of used entries so far.
        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
        }

        /// Used ring element `i`: (descriptor id, length).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let at = self.used + 4 + u64::from(i % self.size) * 8;
            (
                self.mem.read_obj(GuestAddress(at)).unwrap(),
                self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }
    }
}
