//! virtio-net backed by a host tap interface: one receive and one transmit queue, no control
//! queue, the MAC address in config space.
//!
//! Every frame carries the 12-byte `virtio_net_hdr_v1` (virtio 1.x always has `num_buffers`),
//! which the tap reads and writes natively (`IFF_VNET_HDR`, `TUNSETVNETHDRSZ` 12), so checksum
//! and segmentation offloads pass between guest and host kernel without the VMM touching packet
//! contents. Offered, and why each is safe:
//!
//! - `VERSION_1`, `MAC` (from `--net ...,mac=`, else a random locally administered address);
//! - `CSUM`, `HOST_TSO4`, `HOST_TSO6`: the guest may send partially checksummed frames and TCP
//!   segments of up to 64 KiB; a tap accepts both on write and the host kernel finishes them;
//! - `GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`: once acked, the tap is told so
//!   (`TUNSETOFFLOAD` `TUN_F_CSUM|TUN_F_TSO4|TUN_F_TSO6`) and may hand over such frames;
//! - `MRG_RXBUF`: a received frame may span several receive buffers (`num_buffers`), so the
//!   guest can post page-sized buffers and still take 64 KiB segments.
//!
//! Not offered: UFO/USO and ECN segmentation, the control queue (promiscuous/VLAN filtering, MAC
//! changes), multiqueue, `STATUS` (the link is always up), `EVENT_IDX`. Headers that use an
//! offload the guest did not negotiate are dropped, in both directions.
//!
//! Receive: a frame is read from the tap into a host buffer and copied into the guest's
//! buffers. When the guest has no (or not enough) buffers the frame is kept and the tap is not
//! read any more — the tap's own queue holds or drops what follows, as a NIC ring would — until
//! the guest posts buffers and notifies the receive queue. Transmit: each chain is copied out
//! and written to the tap as one frame. Both run on the event loop thread; the tap is watched
//! edge-triggered and its readiness remembered. Malformed chains (addresses outside guest
//! memory, wrong direction, shorter than a header, loops, bad headers) are returned with length
//!
//! Files: `features` (offered features, header checks against what was negotiated, the MAC
//! address, tap offloads), `device` (the [`Net`] device: tap, queues, activation, the
//! receive/transmit loops), `rxtx` (the data path on guest memory: filling receive buffers,
//! draining transmit chains, interrupt suppression) and `event_handler` (event-loop dispatch by
//! token: queue notifications vs tap readiness).

mod device;
mod event_handler;
mod features;
mod rxtx;
#[cfg(test)]
mod tests;

pub use device::{Net, NetError, NetStats};
pub use features::{tap_offload, MacAddr, MAX_FRAME, OFFERED_FEATURES, VNET_HDR_LEN};
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use rxtx::{deliver_rx, drain_tx, RxOutcome};
