//! The virtio-vsock packet header (virtio 1.2 section 5.10.6) and its constants.

use vm_memory::ByteValued;

/// CID of the host.
pub const HOST_CID: u64 = 2;
/// The only socket type supported: stream.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub mod op {
    #![allow(missing_docs)]
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr`, little endian on the wire (and on the x86 host).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

// SAFETY: `Header` is plain old data with no padding (packed) and any bit pattern is valid.
unsafe impl ByteValued for Header {}

/// Size of the header on the wire.
pub const HEADER_SIZE: usize = std::mem::size_of::<Header>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_44_bytes_little_endian() {
        assert_eq!(HEADER_SIZE, 44);
        let h = Header {
            src_cid: 3,
            dst_port: 0x0102_0304,
            op: op::RW,
            ..Default::default()
        };
        let b = h.as_slice();
        assert_eq!(b[0], 3);
        assert_eq!(&b[20..24], &[4, 3, 2, 1]);
        assert_eq!(&b[30..32], &[5, 0]);
    }
}
