//! Fuzzing entry points: guest-controlled bytes in, the real device code path, no panic out.
//!
//! Each `fuzz_*` function turns one input into the guest-visible state a hostile guest
//! controls — a split virtqueue (descriptor table, avail ring) and buffer contents in real
//! guest memory — and runs the real device on it: virtio-blk's request handling, virtio-vsock's
//! TX packet parsing and its connection state machine (with real Unix sockets and the real
//! event manager), virtio-net's transmit and receive chain handling, and virtio-fs's FUSE request framing through fuse-backend-rs on a scratch
//! directory. The cargo-fuzz targets in `vmm/fuzz/` call these; `cargo test -p moat-vmm`
//! replays every file of `vmm/fuzz/corpus/<target>/` through them (see docs/security.md).
//!
//! Input formats (all little-endian):
//! - raw queue (`blk`, `vsock_packet`, `fs` with an odd first byte): 16 descriptors of 16 bytes
//!   (addr, len, flags, next) for a 16-entry queue at [`DESC_TABLE`], then the number of avail
//!   heads (one byte, ≤ 16) and that many `u16` head indexes, then the bytes placed at
//!   [`BUFFERS`] (where well-formed descriptors point).
//! - framed FUSE (`fs` with an even first byte): after that byte, records of `u16` length +
//!   that many bytes; each record becomes one chain: the request readable, a 4 KiB reply
//!   buffer writable.
//! - virtio-net (`net`): a mode byte (bit 0: the receive queue instead of the transmit queue,
//!   bit 1: mergeable receive buffers negotiated, bit 2: checksum and segmentation offloads
//!   negotiated); for the receive queue a `u16` length and that many bytes of frame (virtio-net
//!   header included, as the tap hands it over); then a raw queue. Transmit frames that pass
//!   the device's checks go to a sink instead of a tap (what the tap does with a frame is the
//!   host kernel's business); the receive frame is offered until the queue has no room.
//! - vsock connection (`vsock_conn`): records of a 44-byte vsock header, a `u16` payload
//!   length and the payload, each sent as one well-formed TX packet, with a host listener on
//!   `<uds>_`[`HOST_PORT`] and an RX queue with free buffers; the event loop runs between
//!   packets so host-side events interleave.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::net::{self, RxOutcome};
use crate::devices::virtio::vsock::packet::{op, Header, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use crate::devices::virtio::{blk, fs, vsock, ActivateContext, IrqTrigger, VirtioDevice};

/// Queue size of every fuzzed queue.
pub const QUEUE_SIZE: u16 = 16;
/// Guest address of the fuzzed descriptor table (the avail ring follows at +0x1000, the used
/// ring at +0x2000).
pub const DESC_TABLE: u64 = 0x1000;
/// Guest address where the raw-queue input's buffer bytes go.
pub const BUFFERS: u64 = 0x1_0000;
/// Guest RAM of a fuzz run.
const MEM_SIZE: usize = 1 << 20;
/// Guest CID of the fuzzed vsock device.
pub const GUEST_CID: u64 = 3;
/// Host port with a listener in the `vsock_conn` target.
pub const HOST_PORT: u32 = 6000;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const DESC_BYTES: usize = QUEUE_SIZE as usize * 16;

/// Names of the targets, as used for `vmm/fuzz/corpus/<name>/` and the fuzz binaries.
pub const TARGETS: [&str; 5] = ["blk", "vsock_packet", "vsock_conn", "fs", "net"];

/// Runs `data` through the target called `name` (one of [`TARGETS`]).
pub fn run(name: &str, data: &[u8]) {
    match name {
        "blk" => fuzz_blk(data),
        "vsock_packet" => fuzz_vsock_packet(data),
        "vsock_conn" => fuzz_vsock_conn(data),
        "fs" => fuzz_fs(data),
        "net" => fuzz_net(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("1 MiB of anonymous guest memory")
}

fn queue_at(base: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("valid queue size");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    q
}

fn irq() -> Arc<IrqTrigger> {
    Arc::new(IrqTrigger::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
    ))
}

fn write(mem: &GuestMemoryMmap, at: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(at))
        .expect("fuzz layout lies inside guest memory");
}

fn publish(mem: &GuestMemoryMmap, base: u64, heads: &[u16]) {
    let avail = base + 0x1000;
    for (i, h) in heads.iter().enumerate() {
        write(mem, avail + 4 + 2 * i as u64, &h.to_le_bytes());
    }
    write(mem, avail + 2, &(heads.len() as u16).to_le_bytes());
}

/// Lays a raw-queue input out in `mem` for a queue at `base`.
fn raw_queue(mem: &GuestMemoryMmap, base: u64, data: &[u8]) {
    let mut table = [0u8; DESC_BYTES];
    let n = data.len().min(DESC_BYTES);
    table[..n].copy_from_slice(&data[..n]);
    write(mem, base, &table);
    let rest = data.get(DESC_BYTES..).unwrap_or_default();
    let count = usize::from(rest.first().copied().unwrap_or(0)).min(QUEUE_SIZE.into());
    let heads: Vec<u16> = rest
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(2)
        .take(count)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    publish(mem, base, &heads);
    let bufs = rest.get(1 + 2 * heads.len()..).unwrap_or_default();
    let room = MEM_SIZE - BUFFERS as usize;
    write(mem, BUFFERS, &bufs[..bufs.len().min(room)]);
}

/// Encodes a raw-queue input (for seeds): descriptors `(addr, len, flags, next)`, avail
/// heads, buffer bytes at [`BUFFERS`].
pub fn encode_raw(descs: &[(u64, u32, u16, u16)], heads: &[u16], buffers: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; DESC_BYTES];
    for (i, (addr, len, flags, next)) in descs.iter().enumerate().take(QUEUE_SIZE.into()) {
        let d = &mut v[i * 16..(i + 1) * 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
    }
    v.push(heads.len() as u8);
    for h in heads {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(buffers);
    v
}

/// Descriptor flags for [`encode_raw`].
pub const F_NEXT: u16 = 1;
/// Device-writable descriptor flag for [`encode_raw`].
pub const F_WRITE: u16 = 2;

/// A scratch directory for this process's fuzz runs (disk image, vsock sockets, fs share).
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("moat-vmm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("share")).expect("create the fuzz scratch directory");
        std::fs::write(dir.join("share/file"), b"hello from the host\n")
            .expect("write the fuzz share file");
        std::fs::write(dir.join("disk.img"), vec![0xa5u8; 64 * 512])
            .expect("write the fuzz disk image");
        dir
    })
}

/// Removes this process's scratch directory (disk image, sockets, share). Call once all runs
/// are done; a later run recreates nothing (the directory is made once per process).
pub fn remove_scratch() {
    if let Err(e) = std::fs::remove_dir_all(scratch()) {
        eprintln!("cannot remove {}: {e}", scratch().display());
    }
}

/// virtio-blk: one raw queue against a 32 KiB writable disk image.
pub fn fuzz_blk(data: &[u8]) {
    let mem = memory();
    let mut dev = blk::Block::new(&scratch().join("disk.img"), false).expect("open the fuzz disk");
    raw_queue(&mem, DESC_TABLE, data);
    let ctx = ActivateContext {
        mem,
        queues: vec![queue_at(DESC_TABLE)],
        acked_features: VIRTIO_F_VERSION_1,
        irq: irq(),
    };
    dev.activate(ctx).expect("activate virtio-blk");
    dev.process_queue();
}

/// virtio-fs: framed FUSE requests (even first byte) or a raw queue (odd first byte) on the
/// request queue, served from a scratch directory.
pub fn fuzz_fs(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let mem = memory();
    let mut dev = fs::Fs::new("fuzz", &scratch().join("share")).expect("create the fuzz share");
    if mode & 1 == 1 {
        raw_queue(&mem, DESC_TABLE, body);
    } else {
        framed_fuse(&mem, body);
    }
    let ctx = ActivateContext {
        mem,
        queues: vec![queue_at(0xc_0000), queue_at(DESC_TABLE)],
        acked_features: VIRTIO_F_VERSION_1,
        irq: irq(),
    };
    dev.activate(ctx).expect("activate virtio-fs");
    dev.process_queue(1);
}

const REPLY_SIZE: u32 = 4096;

fn framed_fuse(mem: &GuestMemoryMmap, mut body: &[u8]) {
    let mut heads = Vec::new();
    let mut at = BUFFERS;
    let mut idx = 0u16;
    while body.len() >= 2 && idx + 1 < QUEUE_SIZE {
        let len = usize::from(u16::from_le_bytes([body[0], body[1]])).min(body.len() - 2);
        let req = &body[2..2 + len];
        body = &body[2 + len..];
        let reply = at + len as u64;
        if reply + u64::from(REPLY_SIZE) > MEM_SIZE as u64 {
            break;
        }
        write(mem, at, req);
        let desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            write(mem, DESC_TABLE + u64::from(i) * 16, &d);
        };
        desc(idx, at, len as u32, F_NEXT, idx + 1);
        desc(idx + 1, reply, REPLY_SIZE, F_WRITE, 0);
        heads.push(idx);
        idx += 2;
        at = reply + u64::from(REPLY_SIZE);
    }
    publish(mem, DESC_TABLE, &heads);
}

/// Encodes framed FUSE requests (for seeds).
pub fn encode_fuse(requests: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![0u8];
    for r in requests {
        v.extend_from_slice(&(r.len() as u16).to_le_bytes());
        v.extend_from_slice(r);
    }
    v
}

/// virtio-net: the transmit or the receive queue's chain handling (see the module docs).
pub fn fuzz_net(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let mut acked = VIRTIO_F_VERSION_1 | NET_F_MAC;
    if mode & 2 != 0 {
        acked |= NET_F_MRG_RXBUF;
    }
    if mode & 4 != 0 {
        acked |= NET_OFFLOADS;
    }
    let mem = memory();
    let mut q = queue_at(DESC_TABLE);
    if mode & 1 == 0 {
        raw_queue(&mem, DESC_TABLE, body);
        let mut buf = vec![0u8; net::MAX_FRAME];
        net::drain_tx(&mut q, &mem, acked, &mut buf, |frame| {
            assert!(frame.len() >= net::VNET_HDR_LEN && frame.len() <= net::MAX_FRAME)
        });
        return;
    }
    let len = body
        .get(..2)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let rest = body.get(2..).unwrap_or_default();
    let (frame, queue) = rest.split_at(len.min(rest.len()));
    raw_queue(&mem, DESC_TABLE, queue);
    for _ in 0..QUEUE_SIZE {
        let mut f = frame.to_vec();
        match net::deliver_rx(&mut q, &mem, &mut f, acked).0 {
            RxOutcome::NoBuffers => break,
            RxOutcome::Delivered | RxOutcome::Dropped => {}
        }
    }
}

const NET_F_MAC: u64 = 1 << 5;
const NET_F_MRG_RXBUF: u64 = 1 << 15;
/// CSUM, GUEST_CSUM, GUEST_TSO4/6, HOST_TSO4/6.
const NET_OFFLOADS: u64 = (1 << 0) | (1 << 1) | (1 << 7) | (1 << 8) | (1 << 11) | (1 << 12);

/// Encodes a `net` input for the receive queue (for seeds).
pub fn encode_net_rx(mode: u8, frame: &[u8], queue: &[u8]) -> Vec<u8> {
    let mut v = vec![mode | 1];
    v.extend_from_slice(&(frame.len() as u16).to_le_bytes());
    v.extend_from_slice(frame);
    v.extend_from_slice(queue);
    v
}

/// A vsock device on fresh Unix sockets, activated on three queues, in its own event loop.
struct VsockRig {
    em: EventManager<Arc<Mutex<vsock::Vsock>>>,
    dev: Arc<Mutex<vsock::Vsock>>,
    uds: PathBuf,
    _host: UnixListener,
}

const RX_BASE: u64 = 0x4_0000;
const EV_BASE: u64 = 0x8_0000;
const TXQ: usize = 1;

impl VsockRig {
    fn new(mem: &GuestMemoryMmap) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let uds = scratch().join(format!("v{}.sock", N.fetch_add(1, Ordering::Relaxed)));
        let host = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display()))
            .expect("bind the host-side listener");
        let dev = Arc::new(Mutex::new(
            vsock::Vsock::new(GUEST_CID, &uds).expect("create the vsock device"),
        ));
        // RX: every descriptor a 2 KiB writable buffer, all published.
        let heads: Vec<u16> = (0..QUEUE_SIZE).collect();
        for i in heads.iter().copied() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&(RX_BASE + 0x4000 + u64::from(i) * 2048).to_le_bytes());
            d[8..12].copy_from_slice(&2048u32.to_le_bytes());
            d[12..14].copy_from_slice(&F_WRITE.to_le_bytes());
            write(mem, RX_BASE + u64::from(i) * 16, &d);
        }
        publish(mem, RX_BASE, &heads);
        crate::devices::lock(&dev)
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![queue_at(RX_BASE), queue_at(DESC_TABLE), queue_at(EV_BASE)],
                acked_features: VIRTIO_F_VERSION_1,
                irq: irq(),
            })
            .expect("activate virtio-vsock");
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(dev.clone());
        Self {
            em,
            dev,
            uds,
            _host: host,
        }
    }

    fn kick_tx(&mut self) {
        let _ = crate::devices::lock(&self.dev).queue_events()[TXQ].write(1);
        // Handle the kick and whatever socket events it caused, without blocking.
        for _ in 0..4 {
            if self.em.run_with_timeout(0).unwrap_or(0) == 0 {
                break;
            }
        }
    }
}

impl Drop for VsockRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(format!("{}_{HOST_PORT}", self.uds.display()));
    }
}

/// virtio-vsock TX parsing: one raw TX queue.
pub fn fuzz_vsock_packet(data: &[u8]) {
    let mem = memory();
    raw_queue(&mem, DESC_TABLE, data);
    let mut rig = VsockRig::new(&mem);
    rig.kick_tx();
}

/// virtio-vsock connection state machine: a sequence of well-formed TX packets with
/// arbitrary headers and payloads.
pub fn fuzz_vsock_conn(mut data: &[u8]) {
    let mem = memory();
    let mut rig = VsockRig::new(&mem);
    let mut at = BUFFERS;
    let mut sent = 0u16;
    while data.len() >= HEADER_SIZE + 2 {
        let hdr = &data[..HEADER_SIZE];
        let len = usize::from(u16::from_le_bytes([
            data[HEADER_SIZE],
            data[HEADER_SIZE + 1],
        ]))
        .min(data.len() - HEADER_SIZE - 2)
        .min(4096);
        let payload = &data[HEADER_SIZE + 2..HEADER_SIZE + 2 + len];
        data = &data[HEADER_SIZE + 2 + len..];
        // The header's own length field says how much payload follows: make it agree with
        // the bytes we place, so the packet reaches the state machine.
        let mut h = hdr.to_vec();
        h[24..28].copy_from_slice(&(len as u32).to_le_bytes());
        if at + (HEADER_SIZE + len) as u64 > RX_BASE {
            break;
        }
        write(&mem, at, &h);
        write(&mem, at + HEADER_SIZE as u64, payload);
        let slot = sent % QUEUE_SIZE;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&at.to_le_bytes());
        d[8..12].copy_from_slice(&((HEADER_SIZE + len) as u32).to_le_bytes());
        write(&mem, DESC_TABLE + u64::from(slot) * 16, &d);
        let avail = DESC_TABLE + 0x1000;
        write(&mem, avail + 4 + 2 * u64::from(slot), &slot.to_le_bytes());
        sent = sent.wrapping_add(1);
        write(&mem, avail + 2, &sent.to_le_bytes());
        at += (HEADER_SIZE + len) as u64;
        rig.kick_tx();
    }
}

/// Encodes a vsock header + payload record for [`fuzz_vsock_conn`] (for seeds).
pub fn encode_vsock(src_port: u32, dst_port: u32, op: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: payload.len() as u32,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    };
    let mut v = vm_memory::ByteValued::as_slice(&h).to_vec();
    v.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Seed inputs per target: well-formed requests that reach deep into each device.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let b = BUFFERS;
    match target {
        "blk" => {
            // write sector 1, read sector 1, flush, get-id, bad type.
            let mut bufs = Vec::new();
            let hdr = |kind: u32, sector: u64| {
                let mut h = kind.to_le_bytes().to_vec();
                h.extend_from_slice(&0u32.to_le_bytes());
                h.extend_from_slice(&sector.to_le_bytes());
                h
            };
            bufs.extend(hdr(1, 1)); // 0x00: OUT header
            bufs.extend(hdr(0, 1)); // 0x10: IN header
            bufs.extend(hdr(4, 0)); // 0x20: FLUSH header
            bufs.extend(hdr(8, 0)); // 0x30: GET_ID header
            bufs.resize(0x100, 0);
            bufs.extend(vec![0x5a; 512]); // 0x100: data
            let descs = [
                (b, 16, F_NEXT, 1),
                (b + 0x100, 512, F_NEXT, 2),
                (b + 0x800, 1, F_WRITE, 0),
                (b + 0x10, 16, F_NEXT, 4),
                (b + 0x400, 512, F_WRITE | F_NEXT, 5),
                (b + 0x801, 1, F_WRITE, 0),
                (b + 0x20, 16, F_NEXT, 7),
                (b + 0x802, 1, F_WRITE, 0),
                (b + 0x30, 16, F_NEXT, 9),
                (b + 0x900, 20, F_WRITE | F_NEXT, 10),
                (b + 0x803, 1, F_WRITE, 0),
            ];
            vec![
                encode_raw(&descs, &[0, 3, 6, 8], &bufs),
                // A loop and an out-of-memory address.
                encode_raw(&[(b, 16, F_NEXT, 1), (b, 16, F_NEXT, 0)], &[0], &bufs),
                encode_raw(
                    &[(0xffff_0000, 16, F_NEXT, 1), (b, 1, F_WRITE, 0)],
                    &[0],
                    &bufs,
                ),
            ]
        }
        "vsock_packet" => {
            let req = encode_vsock(1234, HOST_PORT, op::REQUEST, 0, &[]);
            let rw = encode_vsock(1234, HOST_PORT, op::RW, 0, b"hello");
            let mut bufs = req[..HEADER_SIZE].to_vec();
            bufs.resize(0x100, 0);
            bufs.extend_from_slice(&rw[..HEADER_SIZE]);
            bufs.extend_from_slice(b"hello");
            vec![
                encode_raw(
                    &[
                        (b, HEADER_SIZE as u32, 0, 0),
                        (b + 0x100, HEADER_SIZE as u32, F_NEXT, 2),
                        (b + 0x100 + HEADER_SIZE as u64, 5, 0, 0),
                    ],
                    &[0, 1],
                    &bufs,
                ),
                // Short header, then a writable header.
                encode_raw(
                    &[(b, 8, 0, 0), (b, HEADER_SIZE as u32, F_WRITE, 0)],
                    &[0, 1],
                    &bufs,
                ),
            ]
        }
        "vsock_conn" => {
            let mut s1 = encode_vsock(1234, HOST_PORT, op::REQUEST, 0, &[]);
            s1.extend(encode_vsock(1234, HOST_PORT, op::RW, 0, b"ping"));
            s1.extend(encode_vsock(1234, HOST_PORT, op::CREDIT_UPDATE, 0, &[]));
            s1.extend(encode_vsock(1234, HOST_PORT, op::SHUTDOWN, 3, &[]));
            s1.extend(encode_vsock(1234, HOST_PORT, op::RST, 0, &[]));
            let mut s2 = encode_vsock(1, 1, op::RW, 0, b"no connection");
            s2.extend(encode_vsock(77, HOST_PORT + 1, op::REQUEST, 0, &[]));
            s2.extend(encode_vsock(1234, HOST_PORT, op::RESPONSE, 0, &[]));
            vec![s1, s2]
        }
        "fs" => {
            let fuse = |opcode: u32, unique: u64, nodeid: u64, body: &[u8]| {
                let mut v = ((40 + body.len()) as u32).to_le_bytes().to_vec();
                v.extend_from_slice(&opcode.to_le_bytes());
                v.extend_from_slice(&unique.to_le_bytes());
                v.extend_from_slice(&nodeid.to_le_bytes());
                v.extend_from_slice(&[0u8; 16]); // uid, gid, pid, padding
                v.extend_from_slice(body);
                v
            };
            // INIT 7.31, LOOKUP "file", GETATTR root, OPENDIR root.
            let mut init = 7u32.to_le_bytes().to_vec();
            init.extend_from_slice(&31u32.to_le_bytes());
            init.extend_from_slice(&(128u32 * 1024).to_le_bytes());
            init.extend_from_slice(&0u32.to_le_bytes());
            vec![
                encode_fuse(&[
                    fuse(26, 1, 0, &init),
                    fuse(1, 2, 1, b"file\0"),
                    fuse(3, 3, 1, &[0u8; 16]),
                    fuse(27, 4, 1, &[0u8; 8]),
                ]),
                {
                    let mut raw = vec![1u8];
                    raw.extend(encode_raw(
                        &[(b, 40, F_NEXT, 1), (b + 0x100, 64, F_WRITE, 0)],
                        &[0],
                        &fuse(26, 1, 0, &init),
                    ));
                    raw
                },
            ]
        }
        "net" => {
            // A 12-byte header and a 64-byte Ethernet frame.
            let mut frame = vec![0u8; 12];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x88, 0xb5]);
            frame.resize(12 + 64, 0x5a);
            let mut csum = frame.clone();
            csum[0] = 1; // NEEDS_CSUM
            csum[1] = 1; // GSO_TCPV4
                         // Transmit: header and frame in two descriptors, in one, a writable one, a short
                         // one, a loop.
            let tx = |mode: u8, bufs: &[u8]| {
                let mut v = vec![mode];
                v.extend(encode_raw(
                    &[
                        (b, 12, F_NEXT, 1),
                        (b + 12, 64, 0, 0),
                        (b, 76, 0, 0),
                        (b, 76, F_WRITE, 0),
                        (b, 8, 0, 0),
                        (b, 16, F_NEXT, 5),
                    ],
                    &[0, 2, 3, 4, 5],
                    bufs,
                ));
                v
            };
            // Receive: two 40-byte buffers (mergeable), one readable, one too short, one out
            // of guest memory, one 2 KiB buffer.
            let rx = encode_raw(
                &[
                    (b, 40, F_WRITE, 0),
                    (b + 0x40, 40, F_WRITE, 0),
                    (b + 0x80, 100, 0, 0),
                    (b + 0xc0, 8, F_WRITE, 0),
                    (0xffff_0000, 2048, F_WRITE, 0),
                    (b + 0x100, 2048, F_WRITE, 0),
                ],
                &[0, 1, 2, 3, 4, 5],
                &[],
            );
            vec![
                tx(0, &frame),
                tx(4, &csum),
                encode_net_rx(2, &frame, &rx),
                encode_net_rx(4, &csum, &rx),
            ]
        }
        other => panic!("unknown fuzz target {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    /// Every seed and every corpus file of every target, then garbage of many lengths, run
    /// without a panic; the blk seed's write reaches the disk image. One test, so the scratch
    /// directory can be removed at the end.
    #[test]
    fn replay_seeds_corpus_and_garbage() {
        for target in TARGETS {
            let mut n = 0;
            for s in seeds(target) {
                run(target, &s);
                n += 1;
            }
            if let Ok(dir) = std::fs::read_dir(corpus_dir(target)) {
                for e in dir.filter_map(Result::ok) {
                    let data = std::fs::read(e.path()).unwrap();
                    run(target, &data);
                    n += 1;
                }
            }
            assert!(n > 0, "{target}: nothing replayed");
            for len in [0usize, 1, 2, 43, 44, 46, 255, 256, 257, 300, 1000] {
                let data: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
                run(target, &data);
            }
        }
        fuzz_blk(&seeds("blk")[0]);
        let disk = std::fs::read(scratch().join("disk.img")).unwrap();
        assert_eq!(&disk[512..1024], &[0x5a; 512][..]);
        remove_scratch();
        assert!(!scratch().exists());
    }

    /// Writes the seeds into `vmm/fuzz/corpus/<target>/seed-<i>` (run by hand after changing
    /// the seeds: `cargo test -p moat-vmm write_seed_corpus -- --ignored`).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        for target in TARGETS {
            let dir = corpus_dir(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in seeds(target).iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
    }
}
