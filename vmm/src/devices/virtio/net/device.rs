//! The virtio-net device itself: the tap it is attached to, its queues and activation
//! state (including the tap offloads to apply on the event loop thread), and the receive and
//! transmit loops that move frames between the tap and the data path in `rxtx`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use vmm_sys_util::eventfd::EventFd;

use super::features::{bit, check_rx_header, tap_offload, MacAddr, MAX_FRAME, MIN_FRAME};
use super::features::{OFFERED_FEATURES, VNET_HDR_LEN};
use super::rxtx::{deliver_rx, drain_tx, notify, RxOutcome};
use crate::devices::virtio::tap::{Tap, TapError};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};
use crate::metrics::{bump, NetCounters};

pub(super) const QUEUE_SIZE: u16 = 256;
pub(super) const RXQ: usize = 0;
pub(super) const TXQ: usize = 1;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd could not be created.
    #[error("cannot create eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Frame counters of one device (a snapshot of its [`NetCounters`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames read from the tap and dropped (too large for the guest's buffers, bad header).
    pub rx_dropped: u64,
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Guest frames dropped (malformed chain or header, refused by the tap).
    pub tx_dropped: u64,
}

/// The network device.
pub struct Net {
    pub(super) tap: Tap,
    mac: MacAddr,
    pub(super) evts: [EventFd; 2],
    pub(super) active: Option<ActivateContext>,
    /// `TUN_F_*` flags to set on the event loop thread (activation and reset run on a vCPU
    /// thread, whose seccomp filter allows no tap ioctl).
    pub(super) pending_offload: Option<u32>,
    /// The tap may have frames (edge-triggered readiness not consumed yet).
    pub(super) tap_readable: bool,
    /// A frame read from the tap: `rx_buf[..rx_len]`; 0 when none is waiting.
    rx_buf: Vec<u8>,
    pub(super) rx_len: usize,
    tx_buf: Vec<u8>,
    stats: Arc<NetCounters>,
}

impl Net {
    /// Attaches to the existing tap `tap`; the guest sees `mac`.
    pub fn new(tap: &str, mac: MacAddr) -> Result<Self, NetError> {
        let tap = Tap::open(tap, VNET_HDR_LEN)?;
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            tap,
            mac,
            evts: [evt()?, evt()?],
            active: None,
            pending_offload: None,
            tap_readable: true,
            // One byte more than the largest frame: a read that fills it was truncated.
            rx_buf: vec![0; MAX_FRAME + 1],
            rx_len: 0,
            tx_buf: vec![0; MAX_FRAME],
            stats: Arc::default(),
        })
    }

    /// Frame counters, as of now.
    pub fn stats(&self) -> NetStats {
        let c = &self.stats;
        NetStats {
            rx_frames: c.rx_packets.load(Ordering::Relaxed),
            rx_dropped: c.rx_dropped.load(Ordering::Relaxed),
            tx_frames: c.tx_packets.load(Ordering::Relaxed),
            tx_dropped: c.tx_dropped.load(Ordering::Relaxed),
        }
    }

    /// The live counters (bytes too), shared with the control socket's `metrics`.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.stats.clone()
    }

    /// Applies the `TUN_F_*` offloads activation or reset left for the event loop thread.
    pub(super) fn apply_offload(&mut self) {
        if let Some(flags) = self.pending_offload.take() {
            if let Err(e) = self.tap.set_offload(flags) {
                tracing::error!("virtio-net: {e}");
            }
        }
    }

    /// Moves frames from the tap into the guest's receive buffers until either runs out.
    pub fn process_rx(&mut self) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let acked = ctx.acked_features;
        let q = &mut ctx.queues[RXQ];
        let mut used = false;
        loop {
            if self.rx_len == 0 {
                if !self.tap_readable {
                    break;
                }
                match self.tap.read(&mut self.rx_buf) {
                    Ok(n) if n < MIN_FRAME || n >= self.rx_buf.len() => {
                        tracing::debug!(
                            "virtio-net {}: dropping a {n}-byte frame",
                            self.tap.name()
                        );
                        bump(&self.stats.rx_dropped, 1);
                        continue;
                    }
                    Ok(n) => match check_rx_header(&mut self.rx_buf[..VNET_HDR_LEN], acked) {
                        Ok(()) => self.rx_len = n,
                        Err(e) => {
                            tracing::debug!("virtio-net {}: frame dropped: {e}", self.tap.name());
                            bump(&self.stats.rx_dropped, 1);
                            continue;
                        }
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::error!("virtio-net {}: cannot read the tap: {e}", self.tap.name());
                        self.tap_readable = false;
                        break;
                    }
                }
            }
            let (outcome, u) = deliver_rx(q, &mem, &mut self.rx_buf[..self.rx_len], acked);
            used |= u;
            match outcome {
                RxOutcome::Delivered => {
                    bump(&self.stats.rx_packets, 1);
                    bump(
                        &self.stats.rx_bytes,
                        self.rx_len.saturating_sub(VNET_HDR_LEN) as u64,
                    );
                }
                RxOutcome::Dropped => bump(&self.stats.rx_dropped, 1),
                RxOutcome::NoBuffers => break,
            }
            self.rx_len = 0;
        }
        if used {
            notify(q, &mem, &ctx.irq);
        }
    }

    /// Writes every frame the guest queued to the tap.
    pub fn process_tx(&mut self) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        let mem = ctx.mem.clone();
        let (tap, stats) = (&self.tap, &self.stats);
        let q = &mut ctx.queues[TXQ];
        let (used, dropped) = drain_tx(q, &mem, ctx.acked_features, &mut self.tx_buf, |frame| {
            match tap.write(frame) {
                Ok(n) if n == frame.len() => {
                    bump(&stats.tx_packets, 1);
                    bump(&stats.tx_bytes, n.saturating_sub(VNET_HDR_LEN) as u64);
                }
                Ok(n) => {
                    guest_warn!("virtio-net: the tap took {n} of {} bytes", frame.len());
                    bump(&stats.tx_dropped, 1);
                }
                Err(e) => {
                    // EIO: the interface is down; EINVAL: the kernel refused the header.
                    guest_warn!("virtio-net: frame dropped by tap {}: {e}", tap.name());
                    bump(&stats.tx_dropped, 1);
                }
            }
        });
        bump(&stats.tx_dropped, dropped);
        if used > 0 {
            notify(q, &mem, &ctx.irq);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac.0, offset, data)
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        ctx.expect_queues(2)?;
        let offload = tap_offload(ctx.acked_features);
        tracing::info!(
            "virtio-net {} ({}): driver acked features {:#x}, tap offloads {:#x}, mergeable \
             receive buffers {}",
            self.tap.name(),
            self.mac,
            ctx.acked_features,
            offload,
            ctx.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0
        );
        self.pending_offload = Some(offload);
        self.active = Some(ctx);
        // Wake the event loop so it sets the offloads before it reads the next frame.
        self.evts[RXQ]
            .write(1)
            .map_err(|err| ActivateError::Backend {
                what: "cannot wake the event loop",
                err,
            })
    }
    fn reset(&mut self) {
        self.active = None;
        self.rx_len = 0;
        self.pending_offload = Some(0);
        if let Err(e) = self.evts[RXQ].write(1) {
            tracing::error!("virtio-net: cannot wake the event loop after a reset: {e}");
        }
    }
}
