//! The virtio-net data path on guest memory, independent of the tap: offering a received
//! frame to the receive queue (single or merged buffers, published with one used-index
//! update), draining the transmit queue into frames, and the interrupt that honours
//! `VRING_AVAIL_F_NO_INTERRUPT`. Malformed chains are returned with length 0.

use std::io::{Read, Write};
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::features::{bit, check_tx_header, MIN_FRAME, NUM_BUFFERS, VNET_HDR_LEN};
use crate::devices::virtio::{IrqTrigger, INT_VRING};

/// Raises the queue interrupt unless the driver set `VRING_AVAIL_F_NO_INTERRUPT` (without
/// `EVENT_IDX` that flag is how a polling driver, Linux's NAPI, suppresses interrupts).
pub(super) fn notify(q: &Queue, mem: &GuestMemoryMmap, irq: &IrqTrigger) {
    // Order the used ring updates before reading the flags (the driver does the reverse).
    fence(Ordering::SeqCst);
    let flags = mem
        .load::<u16>(GuestAddress(q.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .unwrap_or(0);
    if u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0 {
        irq.trigger(INT_VRING);
    }
}

fn add_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = q.add_used(mem, head, len) {
        guest_warn!("virtio-net: cannot return descriptor {head}: {e}");
    }
}

/// Returns several chains to the used ring and publishes them with a single index update, so
/// the driver never sees part of a merged frame.
fn add_used_batch(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last, last_len), rest)) = elems.split_last() else {
        return Ok(());
    };
    let size = q.size();
    let start = Wrapping(q.next_used());
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= size {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = (start + Wrapping(i as u16)).0 % size;
        let at = q
            .used_ring()
            .checked_add(4 + u64::from(slot) * 8)
            .ok_or(virtio_queue::Error::AddressOverflow)?;
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(at))
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    q.set_next_used((start + Wrapping(rest.len() as u16)).0);
    // Writes the last element and then, with release ordering, the index covering all of them.
    q.add_used(mem, last, last_len)
}

/// Why a receive buffer or a transmit chain was refused (the chain is returned with length 0
/// and the frame dropped).
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// A receive buffer has a descriptor the device may only read.
    #[error("device-readable descriptor in a receive buffer")]
    ReadableRxDescriptor,
    /// A transmit chain has a descriptor the device may write.
    #[error("device-writable descriptor in a transmit chain")]
    WritableTxDescriptor,
    /// The chain cannot be walked in guest memory (bad address, loop, overflow).
    #[error(transparent)]
    Chain(#[from] virtio_queue::Error),
    /// Copying the frame out of guest memory failed.
    #[error(transparent)]
    Copy(#[from] std::io::Error),
    /// A receive buffer cannot even hold the header.
    #[error("receive buffer of {0} bytes is shorter than the header")]
    ShortRxBuffer(usize),
    /// A transmit frame shorter than the virtio-net and Ethernet headers.
    #[error("{0}-byte frame is shorter than the headers")]
    ShortTxFrame(usize),
    /// A transmit frame longer than the largest frame.
    #[error("{len}-byte frame exceeds {max} bytes")]
    LongTxFrame {
        /// The frame's length.
        len: usize,
        /// The largest frame accepted.
        max: usize,
    },
    /// The header uses an offload the driver did not negotiate (or an unknown one).
    #[error("{0}")]
    Header(&'static str),
}

/// What happened to a frame offered to the receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxOutcome {
    /// Copied into guest buffers.
    Delivered,
    /// Not enough guest buffers yet: keep the frame, stop reading the tap.
    NoBuffers,
    /// Cannot be delivered (larger than the guest's buffers can ever hold, or a malformed
    /// buffer among those it would need).
    Dropped,
}

/// A device-writable receive buffer of at least a header's size.
fn rx_buffer<'a>(
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
) -> Result<Writer<'a>, FrameError> {
    if chain.clone().readable().next().is_some() {
        return Err(FrameError::ReadableRxDescriptor);
    }
    let w = chain.writer(mem)?;
    if w.available_bytes() < VNET_HDR_LEN {
        return Err(FrameError::ShortRxBuffer(w.available_bytes()));
    }
    Ok(w)
}

/// Offers `frame` (header included) to the receive queue. Returns the outcome and whether
/// any chain went to the used ring (the caller notifies the driver).
pub(crate) fn deliver_rx(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    acked: u64,
) -> (RxOutcome, bool) {
    if frame.len() < VNET_HDR_LEN {
        return (RxOutcome::Dropped, false);
    }
    let mergeable = acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
    let mut used = false;
    // Chains gathered for this frame, and how many descriptors they took.
    let mut bufs: Vec<(u16, Writer<'_>)> = Vec::new();
    let mut room = 0usize;
    let mut descs = 0usize;
    while room < frame.len() {
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            // Put back what we took. Without mergeable buffers a single chain must hold the
            // frame; with them, a frame larger than the whole ring can never be delivered.
            for _ in &bufs {
                q.go_to_previous_position();
            }
            if descs >= usize::from(q.size()) {
                guest_warn!(
                    "virtio-net: {}-byte frame exceeds every receive buffer posted; dropped",
                    frame.len()
                );
                return (RxOutcome::Dropped, used);
            }
            return (RxOutcome::NoBuffers, used);
        };
        let head = chain.head_index();
        let n = chain.clone().count();
        match rx_buffer(chain, mem) {
            Ok(w) if !mergeable && w.available_bytes() < frame.len() => {
                guest_warn!(
                    "virtio-net: {}-byte frame does not fit the {}-byte receive buffer; dropped",
                    frame.len(),
                    w.available_bytes()
                );
                q.go_to_previous_position();
                return (RxOutcome::Dropped, used);
            }
            Ok(w) => {
                room += w.available_bytes();
                descs += n;
                bufs.push((head, w));
            }
            Err(e) if bufs.is_empty() => {
                guest_warn!("virtio-net: malformed receive buffer: {e}");
                add_used(q, mem, head, 0);
                used = true;
            }
            Err(e) => {
                guest_warn!("virtio-net: malformed receive buffer: {e}; frame dropped");
                let mut elems: Vec<(u16, u32)> = bufs.iter().map(|(h, _)| (*h, 0)).collect();
                elems.push((head, 0));
                if let Err(e) = add_used_batch(q, mem, &elems) {
                    guest_warn!("virtio-net: cannot return receive buffers: {e}");
                }
                return (RxOutcome::Dropped, true);
            }
        }
    }
    let count = bufs.len() as u16;
    frame[NUM_BUFFERS..VNET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
    let mut elems = Vec::with_capacity(bufs.len());
    let mut off = 0;
    for (head, mut w) in bufs {
        let n = (frame.len() - off).min(w.available_bytes());
        if let Err(e) = w.write_all(&frame[off..off + n]) {
            guest_warn!("virtio-net: cannot write a receive buffer: {e}");
        }
        off += n;
        elems.push((head, n as u32));
    }
    if let Err(e) = add_used_batch(q, mem, &elems) {
        guest_warn!("virtio-net: cannot return receive buffers: {e}");
    }
    (RxOutcome::Delivered, true)
}

/// Reads a transmit chain (header and frame, device-readable only) into `buf`.
fn read_tx_frame(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, FrameError> {
    if chain.clone().writable().next().is_some() {
        return Err(FrameError::WritableTxDescriptor);
    }
    let mut r = chain.reader(mem)?;
    let len = r.available_bytes();
    if len < MIN_FRAME {
        return Err(FrameError::ShortTxFrame(len));
    }
    if len > buf.len() {
        return Err(FrameError::LongTxFrame {
            len,
            max: buf.len(),
        });
    }
    r.read_exact(&mut buf[..len])?;
    Ok(len)
}

/// Pops every transmit chain, hands each well-formed frame (header included) to `send` and
/// returns every chain to the used ring. Returns (chains used, frames dropped as malformed).
pub(crate) fn drain_tx<F>(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    acked: u64,
    buf: &mut [u8],
    mut send: F,
) -> (usize, u64)
where
    F: FnMut(&[u8]),
{
    let (mut used, mut dropped) = (0, 0);
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let frame = read_tx_frame(chain, mem, buf).and_then(|len| {
            check_tx_header(&buf[..VNET_HDR_LEN], acked)
                .map(|()| len)
                .map_err(FrameError::Header)
        });
        match frame {
            Ok(len) => send(&buf[..len]),
            Err(e) => {
                guest_warn!("virtio-net: transmit frame dropped: {e}");
                dropped += 1;
            }
        }
        add_used(q, mem, head, 0);
        used += 1;
    }
    (used, dropped)
}
