//! virtio-vsock device: the guest's `AF_VSOCK` stream sockets, bridged to host Unix sockets
//! by the [`muxer::Muxer`] (hybrid style, see docs/vmm.md). Queues: RX (device → guest),
//! TX (guest → device) and the event queue (unused: we never reset the transport).
//!
//! This file owns the device (config, activation, the TX/RX queue loops); `event_handler`
//! dispatches event-loop wake-ups by token, `muxer` owns the host connections, `packet` the
//! wire header.

mod event_handler;
pub mod muxer;
pub mod packet;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use event_manager::EventOps;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    device_type, ActivateContext, ActivateError, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::metrics::{bump, VsockCounters};
use muxer::{Muxer, MuxerError, MAX_PAYLOAD};
use packet::Header;

const QUEUE_SIZE: u16 = 256;
const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;

/// Errors creating the device, and why a TX packet was refused (logged, the chain returned).
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A TX chain cannot be walked in guest memory.
    #[error(transparent)]
    Chain(#[from] virtio_queue::Error),
    /// A TX chain shorter than the packet header.
    #[error("short header: {0}")]
    ShortHeader(#[source] std::io::Error),
    /// The header announces more payload than the chain (or a packet) holds.
    #[error("payload length {0} exceeds the buffer")]
    PayloadLength(usize),
    /// The payload could not be copied out of guest memory.
    #[error("{0}")]
    Payload(#[source] std::io::Error),
    /// The guest CID is reserved (0, 1, 2 and `u32::MAX` are not guest CIDs).
    #[error("invalid guest CID {0}: use a value from 3 to 4294967294")]
    Cid(u64),
    /// The host Unix socket could not be set up.
    #[error(transparent)]
    Muxer(#[from] MuxerError),
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    evts: [EventFd; 3],
    active: Option<ActivateContext>,
    muxer: Muxer,
    /// The driver reset the device: close every connection on the next event loop pass.
    reset_pending: bool,
    stats: Arc<VsockCounters>,
}

impl Vsock {
    /// A device for guest CID `cid` whose host side listens on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(cid));
        }
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            cid,
            evts: [evt()?, evt()?, evt()?],
            active: None,
            muxer: Muxer::new(uds_path, cid)?,
            reset_pending: false,
            stats: Arc::default(),
        })
    }

    /// The device's counters, shared with the control socket's `metrics`.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.stats.clone()
    }

    /// Consumes every packet the guest sent.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let mut used = false;
        while let Some(chain) = ctx.queues[TXQ].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match read_packet(chain, &mem) {
                Ok((h, payload)) => {
                    bump(&self.stats.tx_packets, 1);
                    bump(&self.stats.tx_bytes, payload.len() as u64);
                    self.muxer.handle_guest_packet(h, &payload, ops)
                }
                Err(e) => guest_warn!("vsock: malformed TX packet: {e}"),
            }
            if let Err(e) = ctx.queues[TXQ].add_used(&mem, head, 0) {
                tracing::error!("vsock: cannot return TX descriptor: {e}");
            }
            used = true;
        }
        if used {
            ctx.irq.trigger(INT_VRING);
        }
    }

    /// Fills guest RX buffers while there is something to send.
    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let mut used = false;
        while self.muxer.has_rx_work() {
            let Some(chain) = ctx.queues[RXQ].pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match chain.writer(&mem) {
                Ok(mut w) => match self.muxer.fill_rx(&mut w, ops) {
                    Some(len) => {
                        bump(&self.stats.rx_packets, 1);
                        let payload = len.saturating_sub(packet::HEADER_SIZE);
                        bump(&self.stats.rx_bytes, payload as u64);
                        len
                    }
                    None => {
                        ctx.queues[RXQ].go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    guest_warn!("vsock: malformed RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = ctx.queues[RXQ].add_used(&mem, head, len as u32) {
                tracing::error!("vsock: cannot return RX descriptor: {e}");
            }
            used = true;
        }
        if used {
            ctx.irq.trigger(INT_VRING);
        }
    }
}

/// Reads header and payload of one TX packet.
fn read_packet(
    chain: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>,
    mem: &vm_memory::GuestMemoryMmap,
) -> Result<(Header, Vec<u8>), VsockError> {
    let mut r = chain.reader(mem)?;
    let h: Header = r.read_obj().map_err(VsockError::ShortHeader)?;
    let len = h.len as usize;
    if len > MAX_PAYLOAD || len > r.available_bytes() {
        return Err(VsockError::PayloadLength(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(VsockError::Payload)?;
    Ok((h, payload))
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.cid.to_le_bytes(), offset, data)
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(3)?;
        self.active = Some(ctx);
        // Host connections may already be waiting; the guest kicks RX once it posts buffers.
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        // Connections die with the driver; the event loop (woken through the event queue's
        // eventfd) closes them, since only it can unregister their fds.
        self.reset_pending = true;
        if let Err(e) = self.evts[EVQ].write(1) {
            tracing::error!("vsock: cannot wake the event loop after a reset: {e}");
        }
    }
}

#[cfg(test)]
mod tests;
