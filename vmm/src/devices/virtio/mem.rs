//! virtio-mem: guest RAM that grows and shrinks while the VM runs, in [`BLOCK_SIZE`] blocks of
//! a device region above the boot RAM (virtio 1.2, 5.15). The control socket's `resize` sets the
//! requested size and raises a config interrupt; the guest driver then asks to plug (or unplug)
//! blocks until its plugged size matches, and onlines the new memory itself.
//!
//! The whole region is mapped `MAP_NORESERVE` and registered with KVM from the start, so
//! plugging is bookkeeping: the host pays for a page when the guest first touches it, like boot
//! RAM. Unplugged blocks are dropped from the VMM's memory (`MADV_DONTNEED`). The guest is
//! hostile: every request is checked against the region, the block size and the plug state, and
//! plugging past the requested size is refused (`NACK`). A guest that touches unplugged memory
//! anyway only allocates pages charged to its own cgroup, which bounds it.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    device_type, drain_queue, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
    INT_CONFIG, VIRTIO_F_VERSION_1,
};

/// Plug granularity: 2 MiB, the host's huge page (Linux groups blocks into its own 128 MiB
/// memory blocks when onlining).
pub const BLOCK_SIZE: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 128;

const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// Request: type, 3 × padding, addr, nb_blocks, 3 × padding.
const REQ_LEN: usize = 24;
/// Response: type, 3 × padding, state.
const RESP_LEN: u32 = 10;

/// A resize the device cannot do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemError {
    /// The size is not a multiple of the block size or larger than the region.
    #[error(
        "cannot resize hotplug memory to {asked} MiB: it must be a multiple of {} MiB and at \
         most the region's {region} MiB (moat-vmm --mem-hotplug-mib)",
        BLOCK_SIZE >> 20
    )]
    Size {
        /// Requested, MiB.
        asked: u64,
        /// Region size, MiB.
        region: u64,
    },
}

/// The virtio-mem device.
pub struct VirtioMem {
    evts: [EventFd; 1],
    addr: u64,
    region_size: u64,
    plugged: Vec<bool>,
    plugged_size: u64,
    requested_size: u64,
    generation: u32,
    active: Option<ActivateContext>,
    mem: GuestMemoryMmap,
}

impl VirtioMem {
    /// A device for the region `addr..addr + region_size` of `mem` (both multiples of
    /// [`BLOCK_SIZE`]), nothing plugged or requested yet.
    pub fn new(mem: GuestMemoryMmap, addr: u64, region_size: u64) -> std::io::Result<Self> {
        Ok(Self {
            evts: [EventFd::new(libc::EFD_NONBLOCK)?],
            addr,
            region_size,
            plugged: vec![false; (region_size / BLOCK_SIZE) as usize],
            plugged_size: 0,
            requested_size: 0,
            generation: 0,
            active: None,
            mem,
        })
    }

    /// Asks the guest to have `bytes` of the region plugged (it plugs or unplugs to match).
    pub fn resize(&mut self, bytes: u64) -> Result<(), MemError> {
        if !bytes.is_multiple_of(BLOCK_SIZE) || bytes > self.region_size {
            return Err(MemError::Size {
                asked: bytes >> 20,
                region: self.region_size >> 20,
            });
        }
        if bytes != self.requested_size {
            self.requested_size = bytes;
            self.generation = self.generation.wrapping_add(1);
            if let Some(ctx) = &self.active {
                ctx.irq.trigger(INT_CONFIG);
            }
        }
        Ok(())
    }

    /// Size of the hotplug region, bytes.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// `(requested, plugged)` bytes.
    pub fn sizes(&self) -> (u64, u64) {
        (self.requested_size, self.plugged_size)
    }

    fn config(&self) -> [u8; 56] {
        let mut c = [0u8; 56];
        c[0..8].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        // node_id 0 and padding: bytes 8..16.
        c[16..24].copy_from_slice(&self.addr.to_le_bytes());
        c[24..32].copy_from_slice(&self.region_size.to_le_bytes());
        // usable_region_size: the whole region is usable.
        c[32..40].copy_from_slice(&self.region_size.to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size.to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }

    /// The blocks of `addr + nb_blocks` blocks, if that range is block-aligned and inside the
    /// region.
    fn blocks(&self, addr: u64, nb_blocks: u16) -> Option<std::ops::Range<usize>> {
        let len = u64::from(nb_blocks).checked_mul(BLOCK_SIZE)?;
        let off = addr.checked_sub(self.addr)?;
        if nb_blocks == 0
            || !off.is_multiple_of(BLOCK_SIZE)
            || off.checked_add(len)? > self.region_size
        {
            return None;
        }
        let first = (off / BLOCK_SIZE) as usize;
        Some(first..first + usize::from(nb_blocks))
    }

    /// Drops the host pages of `blocks`.
    fn discard(&self, blocks: std::ops::Range<usize>) {
        let at = self.addr + blocks.start as u64 * BLOCK_SIZE;
        let len = blocks.len() as u64 * BLOCK_SIZE;
        if let Err(e) = super::discard_guest_range(&self.mem, at, len) {
            tracing::warn!("virtio-mem: cannot drop unplugged memory {at:#x}+{len:#x}: {e}");
        }
    }

    /// Handles one request; returns (response type, state).
    fn request(&mut self, req: &[u8; REQ_LEN]) -> (u16, u16) {
        let ty = u16::from_le_bytes([req[0], req[1]]);
        let addr = u64::from_le_bytes(req[8..16].try_into().unwrap_or_default());
        let nb = u16::from_le_bytes([req[16], req[17]]);
        if ty == REQ_UNPLUG_ALL {
            self.discard(0..self.plugged.len());
            self.plugged.fill(false);
            self.plugged_size = 0;
            return (RESP_ACK, 0);
        }
        let Some(range) = self.blocks(addr, nb) else {
            guest_warn!(
                "virtio-mem: request {ty} for {addr:#x} × {nb} blocks is outside the region"
            );
            return (RESP_ERROR, 0);
        };
        let plugged = self.plugged[range.clone()].iter().filter(|p| **p).count();
        let size = range.len() as u64 * BLOCK_SIZE;
        match ty {
            REQ_PLUG if plugged != 0 => (RESP_ERROR, 0),
            REQ_PLUG if self.plugged_size + size > self.requested_size => (RESP_NACK, 0),
            REQ_PLUG => {
                self.plugged[range].fill(true);
                self.plugged_size += size;
                (RESP_ACK, 0)
            }
            REQ_UNPLUG if plugged != range.len() => (RESP_ERROR, 0),
            REQ_UNPLUG => {
                self.discard(range.clone());
                self.plugged[range].fill(false);
                self.plugged_size -= size;
                (RESP_ACK, 0)
            }
            REQ_STATE => {
                let state = match plugged {
                    0 => STATE_UNPLUGGED,
                    n if n == range.len() => STATE_PLUGGED,
                    _ => STATE_MIXED,
                };
                (RESP_ACK, state)
            }
            _ => {
                guest_warn!("virtio-mem: unknown request type {ty}");
                (RESP_ERROR, 0)
            }
        }
    }

    /// Serves every pending request.
    pub fn process_queue(&mut self) {
        let Some(mut ctx) = self.active.take() else {
            return;
        };
        let mem = ctx.mem.clone();
        let irq = ctx.irq.clone();
        drain_queue(&mut ctx.queues[0], &mem, &irq, |chain| {
            let mut req = [0u8; REQ_LEN];
            let mut resp_at = None;
            let mut read = 0usize;
            for d in chain {
                if d.is_write_only() {
                    if d.len() >= RESP_LEN && resp_at.is_none() {
                        resp_at = Some(d.addr());
                    }
                } else if read < REQ_LEN {
                    let n = (d.len() as usize).min(REQ_LEN - read);
                    if mem.read_slice(&mut req[read..read + n], d.addr()).is_err() {
                        return 0;
                    }
                    read += n;
                }
            }
            let Some(resp_at) = resp_at.filter(|_| read == REQ_LEN) else {
                guest_warn!("virtio-mem: malformed request chain");
                return 0;
            };
            let (ty, state) = self.request(&req);
            let mut resp = [0u8; RESP_LEN as usize];
            resp[0..2].copy_from_slice(&ty.to_le_bytes());
            resp[8..10].copy_from_slice(&state.to_le_bytes());
            match mem.write_slice(&resp, resp_at) {
                Ok(()) => RESP_LEN,
                Err(_) => 0,
            }
        });
        self.active = Some(ctx);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        device_type::MEM
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn config_generation(&self) -> u32 {
        self.generation
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(1)?;
        self.active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

impl MutEventSubscriber for VirtioMem {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if super::fired_queue(&self.evts, &events).is_some() {
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        super::register_queue_events(&self.evts, ops, "virtio-mem");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{resident, Driver};
    use crate::devices::virtio::IrqTrigger;
    use std::sync::Arc;
    use vm_memory::GuestAddress;

    const REGION: u64 = 0x40_0000; // 4 MiB into the test memory
    const SIZE: u64 = 4 * BLOCK_SIZE;

    /// Sends one request through the queue; returns (response type, state).
    fn call(d: &mut Driver, dev: &mut VirtioMem, ty: u16, addr: u64, nb: u16) -> (u16, u16) {
        let mut r = [0u8; REQ_LEN];
        r[0..2].copy_from_slice(&ty.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&nb.to_le_bytes());
        d.mem.write_slice(&r, GuestAddress(0x10000)).unwrap();
        d.mem
            .write_slice(&[0xff; 10], GuestAddress(0x20000))
            .unwrap();
        let before = d.used_idx();
        d.add_chain(&[(0x10000, REQ_LEN as u32, false), (0x20000, 16, true)]);
        dev.process_queue();
        assert_eq!(d.used_idx(), before.wrapping_add(1));
        let mut resp = [0u8; 10];
        d.mem.read_slice(&mut resp, GuestAddress(0x20000)).unwrap();
        (
            u16::from_le_bytes([resp[0], resp[1]]),
            u16::from_le_bytes([resp[8], resp[9]]),
        )
    }

    #[test]
    fn plug_within_the_request_unplug_gives_memory_back() {
        let (mut d, mut dev) = device();
        let b = |i: u64| REGION + i * BLOCK_SIZE;
        // Nothing requested yet: a plug is refused.
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(0), 1), (RESP_NACK, 0));
        dev.resize(2 * BLOCK_SIZE).unwrap();
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(0), 2), (RESP_ACK, 0));
        assert_eq!(dev.sizes(), (2 * BLOCK_SIZE, 2 * BLOCK_SIZE));
        // Past the requested size, twice plugged, outside, unaligned, zero blocks.
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(2), 1), (RESP_NACK, 0));
        dev.resize(4 * BLOCK_SIZE).unwrap();
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(1), 2), (RESP_ERROR, 0));
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(3), 2), (RESP_ERROR, 0));
        assert_eq!(
            call(&mut d, &mut dev, REQ_PLUG, b(2) + 4096, 1),
            (RESP_ERROR, 0)
        );
        assert_eq!(
            call(&mut d, &mut dev, REQ_PLUG, REGION - BLOCK_SIZE, 1),
            (RESP_ERROR, 0)
        );
        assert_eq!(call(&mut d, &mut dev, REQ_PLUG, b(2), 0), (RESP_ERROR, 0));
        assert_eq!(
            call(&mut d, &mut dev, REQ_PLUG, u64::MAX - 4095, 1),
            (RESP_ERROR, 0)
        );
        assert_eq!(
            call(&mut d, &mut dev, REQ_STATE, b(0), 2),
            (RESP_ACK, STATE_PLUGGED)
        );
        assert_eq!(
            call(&mut d, &mut dev, REQ_STATE, b(1), 2),
            (RESP_ACK, STATE_MIXED)
        );
        assert_eq!(
            call(&mut d, &mut dev, REQ_STATE, b(2), 2),
            (RESP_ACK, STATE_UNPLUGGED)
        );

        // The guest uses block 1, then gives it back: its host pages go.
        let len = BLOCK_SIZE as usize;
        d.mem
            .write_slice(&vec![7u8; len], GuestAddress(b(1)))
            .unwrap();
        assert_eq!(resident(&d.mem, b(1), len), len);
        assert_eq!(
            call(&mut d, &mut dev, REQ_UNPLUG, b(1), 2),
            (RESP_ERROR, 0),
            "block 2 is not plugged"
        );
        assert_eq!(call(&mut d, &mut dev, REQ_UNPLUG, b(1), 1), (RESP_ACK, 0));
        assert_eq!(resident(&d.mem, b(1), len), 0);
        assert_eq!(dev.sizes().1, BLOCK_SIZE);
        assert_eq!(call(&mut d, &mut dev, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
        assert_eq!(dev.sizes().1, 0);
        assert_eq!(call(&mut d, &mut dev, 9, b(0), 1), (RESP_ERROR, 0));
    }

    fn device() -> (Driver, VirtioMem) {
        // 16 MiB of test memory; the "region" is 8 MiB of it at 4 MiB.
        let d = Driver::new(QUEUE_SIZE);
        let mut dev = VirtioMem::new(d.mem.clone(), REGION, SIZE).unwrap();
        dev.activate(ActivateContext {
            mem: d.mem.clone(),
            queues: vec![d.queue()],
            acked_features: VIRTIO_F_VERSION_1,
            irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        (d, dev)
    }

    #[test]
    fn resize_checks_the_size_and_raises_a_config_interrupt() {
        let (_d, mut dev) = device();
        assert!(dev.resize(BLOCK_SIZE + 1).is_err());
        assert!(dev.resize(SIZE + BLOCK_SIZE).is_err());
        dev.resize(2 * BLOCK_SIZE).unwrap();
        let irq = dev.active.as_ref().unwrap().irq.clone();
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(dev.config_generation(), 1);
        let mut c = [0u8; 8];
        dev.read_config(48, &mut c);
        assert_eq!(u64::from_le_bytes(c), 2 * BLOCK_SIZE);
        dev.read_config(16, &mut c);
        assert_eq!(u64::from_le_bytes(c), REGION);
    }
}
