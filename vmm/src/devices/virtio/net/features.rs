//! What the virtio-net device offers and how headers are judged against what the driver
//! negotiated: the feature bits, the `virtio_net_hdr_v1` layout and frame size limits, the
//! tap offloads matching the acked features, and the guest's MAC address.

use std::fmt;
use std::str::FromStr;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
};

use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
pub(super) const NUM_BUFFERS: usize = 10;
/// Shortest frame: a header and an Ethernet header.
pub(super) const MIN_FRAME: usize = VNET_HDR_LEN + 14;
/// Largest frame with its header: a 64 KiB IP packet (a TSO segment) with Ethernet and VLAN
/// headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 14 + 4 + 65535;
/// `VIRTIO_NET_HDR_GSO_ECN`, the ECN bit of `gso_type`.
pub(super) const GSO_ECN: u8 = 0x80;

/// Feature bit `b` as a mask.
pub(super) const fn bit(b: u32) -> u64 {
    1 << b
}

/// Features the device offers (see the module documentation for why).
pub const OFFERED_FEATURES: u64 = VIRTIO_F_VERSION_1
    | bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_MRG_RXBUF);

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random unicast, locally administered address (first byte `x2`, `x6`, `xA` or `xE`).
    /// Fails only when the kernel has no random bytes to give (`getrandom`).
    pub fn random_local() -> std::io::Result<Self> {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        b[0] = (b[0] & 0xfc) | 0x02;
        Ok(Self(b))
    }
}

impl FromStr for MacAddr {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        const WHY: &str = "a unicast MAC address AA:BB:CC:DD:EE:FF (AA even, not all zero)";
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or(WHY)?;
            if p.len() != 2 {
                return Err(WHY);
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| WHY)?;
        }
        if parts.next().is_some() || b[0] & 1 != 0 || b == [0; 6] {
            return Err(WHY);
        }
        Ok(Self(b))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The `TUN_F_*` offloads the tap may use towards a guest that acked `acked`.
pub fn tap_offload(acked: u64) -> u32 {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        // Segmentation offloads need checksum offload (the kernel refuses them alone).
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
        f |= libc::TUN_F_TSO6;
    }
    f
}

/// Checks a guest frame's header against the negotiated offloads.
pub(super) fn check_tx_header(hdr: &[u8], acked: u64) -> Result<(), &'static str> {
    let (flags, gso) = (u32::from(hdr[0]), hdr[1]);
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err("unknown header flags");
    }
    if flags != 0 && acked & bit(VIRTIO_NET_F_CSUM) == 0 {
        return Err("checksum offload used but not negotiated");
    }
    let needed = match u32::from(gso) {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        _ => return Err("segmentation offload type not offered"),
    };
    if acked & bit(needed) == 0 {
        return Err("segmentation offload used but not negotiated");
    }
    Ok(())
}

/// Checks (and for a guest without checksum offload, clears) the header of a frame from the
/// tap: a frame using an offload the guest did not ack cannot be delivered.
pub(super) fn check_rx_header(hdr: &mut [u8], acked: u64) -> Result<(), &'static str> {
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) == 0 {
        if u32::from(hdr[0]) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return Err("partially checksummed frame for a guest without checksum offload");
        }
        // DATA_VALID is only meaningful with GUEST_CSUM: the flags must be 0 then.
        hdr[0] = 0;
    }
    let needed = match u32::from(hdr[1]) {
        VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
        _ if hdr[1] & GSO_ECN != 0 => return Err("ECN segmentation offload not negotiated"),
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
        _ => return Err("segmentation offload type not negotiated"),
    };
    if acked & bit(needed) == 0 {
        return Err("segmentation offload not negotiated");
    }
    Ok(())
}
