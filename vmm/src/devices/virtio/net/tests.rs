//! Tests of virtio-net: feature negotiation and header checks, the data path on guest memory
//! with well-formed and malformed chains, and the device on real taps in a private network
//! namespace (offloads through the MMIO transport, receive flow control, transmit to the
//! host stack).

use super::device::*;
use super::features::*;
use super::rxtx::*;
use crate::devices::lock;
use crate::devices::virtio::mmio::{reg, status, MmioTransport};
use crate::devices::virtio::tap::testing::{private_tap, run_ip};
use crate::devices::virtio::testing::{Driver, NEXT, WRITE};
use crate::devices::virtio::{ActivateContext, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use event_manager::{EventManager, SubscriberOps};
use std::net::UdpSocket;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const TX_BASE: u64 = 0x8000;
const BUFS: u64 = 0x10_0000;
const GUEST_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x02]);

/// RX driver at 0x1000 and TX driver at `TX_BASE`, in one 16 MiB guest memory.
fn drivers() -> (Driver, Driver) {
    let rx = Driver::new(QUEUE_SIZE);
    let tx = Driver::with_memory(rx.mem.clone(), TX_BASE, QUEUE_SIZE);
    (rx, tx)
}

fn irq() -> Arc<IrqTrigger> {
    Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
}

fn ctx(rx: &Driver, tx: &Driver, acked: u64) -> ActivateContext {
    ActivateContext {
        mem: rx.mem.clone(),
        queues: vec![rx.queue(), tx.queue()],
        acked_features: acked,
        irq: irq(),
    }
}

fn read(d: &Driver, addr: u64, len: u32) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn hdr(flags: u8, gso: u8) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h
}

/// A header plus an Ethernet frame of `payload_len` bytes after the Ethernet header.
fn frame(payload_len: usize) -> Vec<u8> {
    let mut f = hdr(0, 0).to_vec();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..payload_len).map(|i| i as u8));
    f
}

#[test]
fn mac_addresses() {
    let m: MacAddr = "02:AB:cd:00:11:ff".parse().unwrap();
    assert_eq!(m.0, [2, 0xab, 0xcd, 0, 0x11, 0xff]);
    assert_eq!(m.to_string(), "02:ab:cd:00:11:ff");
    for bad in [
        "",
        "02:00:00:00:00",
        "02:00:00:00:00:00:00",
        "01:00:00:00:00:01",
        "00:00:00:00:00:00",
        "2:00:00:00:00:01",
        "02-00-00-00-00-01",
        "0g:00:00:00:00:01",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?}");
    }
    let r = MacAddr::random_local().unwrap();
    assert_eq!(r.0[0] & 3, 2, "{r}: unicast and locally administered");
    assert_eq!(r.to_string().parse::<MacAddr>().unwrap(), r);
}

#[test]
fn offloads_follow_the_acked_features() {
    let v1 = VIRTIO_F_VERSION_1;
    assert_eq!(tap_offload(v1), 0);
    // TSO without checksum offload is not something the tap (or the spec) allows.
    assert_eq!(tap_offload(v1 | bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tap_offload(v1 | bit(VIRTIO_NET_F_GUEST_CSUM)),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offload(OFFERED_FEATURES),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
    // Host offloads (guest → tap) need no tap setting.
    assert_eq!(tap_offload(v1 | bit(VIRTIO_NET_F_HOST_TSO4)), 0);

    let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let (tcp4, tcp6) = (
        VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        VIRTIO_NET_HDR_GSO_TCPV6 as u8,
    );
    assert!(check_tx_header(&hdr(0, 0), v1).is_ok());
    assert!(check_tx_header(&hdr(csum, 0), v1).is_err());
    assert!(check_tx_header(&hdr(csum, 0), v1 | bit(VIRTIO_NET_F_CSUM)).is_ok());
    assert!(check_tx_header(&hdr(csum, tcp4), OFFERED_FEATURES).is_ok());
    assert!(check_tx_header(&hdr(csum, tcp6), OFFERED_FEATURES).is_ok());
    assert!(check_tx_header(&hdr(csum, tcp4), v1 | bit(VIRTIO_NET_F_CSUM)).is_err());
    assert!(check_tx_header(&hdr(csum, tcp4 | GSO_ECN), OFFERED_FEATURES).is_err());
    assert!(check_tx_header(&hdr(csum, 3), OFFERED_FEATURES).is_err()); // UFO
    assert!(check_tx_header(&hdr(4, 0), OFFERED_FEATURES).is_err());

    let mut h = hdr(2, 0); // DATA_VALID
    check_rx_header(&mut h, v1).unwrap();
    assert_eq!(h[0], 0, "flags must be 0 without GUEST_CSUM");
    let mut h = hdr(2, 0);
    check_rx_header(&mut h, OFFERED_FEATURES).unwrap();
    assert_eq!(h[0], 2);
    assert!(check_rx_header(&mut hdr(csum, 0), v1).is_err());
    assert!(check_rx_header(&mut hdr(csum, tcp4), OFFERED_FEATURES).is_ok());
    let only_csum = v1 | bit(VIRTIO_NET_F_GUEST_CSUM);
    assert!(check_rx_header(&mut hdr(csum, tcp4), only_csum).is_err());
    assert!(check_rx_header(&mut hdr(csum, tcp4 | GSO_ECN), OFFERED_FEATURES).is_err());
    assert!(check_rx_header(&mut hdr(csum, 5), OFFERED_FEATURES).is_err()); // USO
}

#[test]
fn rx_single_and_merged_buffers() {
    let (mut rx, _tx) = drivers();
    let mut q = rx.queue();
    let v1 = VIRTIO_F_VERSION_1;
    // Without MRG_RXBUF one chain (here two descriptors) takes the whole frame.
    let mut f = frame(200);
    let head = rx.add_chain(&[(BUFS, 100, true), (BUFS + 0x1000, 200, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, v1),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used(0), (u32::from(head), f.len() as u32));
    let mut got = read(&rx, BUFS, 100);
    got.extend(read(&rx, BUFS + 0x1000, f.len() as u32 - 100));
    assert_eq!(&got[..NUM_BUFFERS], &f[..NUM_BUFFERS]);
    assert_eq!(&got[NUM_BUFFERS..VNET_HDR_LEN], &1u16.to_le_bytes());
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);

    // With MRG_RXBUF a frame spans buffers; all of them are published at once.
    let mrg = v1 | bit(VIRTIO_NET_F_MRG_RXBUF);
    let mut f = frame(150); // 176 bytes: three 64-byte buffers
    for i in 0..4 {
        rx.add_chain(&[(BUFS + 0x2000 + i * 0x100, 64, true)]);
    }
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used_idx(), 4);
    let mut got = Vec::new();
    for i in 1..4 {
        let (id, len) = rx.used(i);
        assert_eq!(u64::from(id), 2 + u64::from(i) - 1);
        got.extend(read(&rx, BUFS + 0x2000 + u64::from(i - 1) * 0x100, len));
    }
    assert_eq!(got.len(), f.len());
    assert_eq!(&got[NUM_BUFFERS..VNET_HDR_LEN], &3u16.to_le_bytes());
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    // The fourth buffer is still available for the next (small) frame.
    let mut small = frame(10);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut small, mrg),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used(4), (5, small.len() as u32));
}

#[test]
fn rx_waits_for_buffers_and_drops_what_can_never_fit() {
    let (mut rx, _tx) = drivers();
    let mut q = rx.queue();
    let v1 = VIRTIO_F_VERSION_1;
    let mrg = v1 | bit(VIRTIO_NET_F_MRG_RXBUF);
    let mut f = frame(500);
    // No buffers at all: wait, consume nothing.
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::NoBuffers, false)
    );
    // Not enough yet (mergeable): the chains taken are put back.
    rx.add_chain(&[(BUFS, 256, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::NoBuffers, false)
    );
    rx.add_chain(&[(BUFS + 0x1000, 512, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used_idx(), 2);
    // Without MRG_RXBUF a too-small chain drops the frame and stays available.
    rx.add_chain(&[(BUFS, 100, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, v1),
        (RxOutcome::Dropped, false)
    );
    let mut small = frame(50);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut small, v1),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used(2).1, small.len() as u32);
    // A frame larger than a whole ring of buffers is dropped instead of waiting forever.
    let mut tiny = Driver::new(4);
    let mut q = tiny.queue();
    for i in 0..4 {
        tiny.add_chain(&[(BUFS + i * 0x100, 64, true)]);
    }
    assert_eq!(
        deliver_rx(&mut q, &tiny.mem, &mut f, mrg),
        (RxOutcome::Dropped, false)
    );
    assert_eq!(
        deliver_rx(&mut q, &tiny.mem, &mut small, mrg),
        (RxOutcome::Delivered, true)
    );
    // A frame shorter than a header is never delivered.
    assert_eq!(
        deliver_rx(&mut q, &tiny.mem, &mut [0u8; 4], mrg),
        (RxOutcome::Dropped, false)
    );
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let (mut rx, _tx) = drivers();
    let mut q = rx.queue();
    let mrg = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF);
    let mut f = frame(100);
    rx.add_chain(&[(0x4000_0000, 2048, true)]); // outside guest memory
    rx.add_chain(&[(BUFS, 2048, false)]); // device-readable
    rx.add_chain(&[(BUFS, 8, true)]); // shorter than the header
    rx.add_chain(&[(BUFS, 64, false), (BUFS + 64, 2048, true)]); // mixed directions
                                                                 // A descriptor whose next is itself: the chain ends after the queue size.
    rx.write_desc(10, BUFS + 0x1000, 16, WRITE | NEXT, 10);
    rx.publish(10);
    rx.add_chain(&[(BUFS + 0x2000, 2048, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::Delivered, true)
    );
    // The looping chain has 256 x 16 bytes: a valid (if odd) buffer that takes the frame.
    assert_eq!(rx.used_idx(), 5);
    for i in 0..4 {
        assert_eq!(rx.used(i).1, 0, "used {i}");
    }
    assert_eq!(rx.used(4), (10, f.len() as u32));
    // The buffer posted after the loop is still there.
    let mut small = frame(10);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut small, mrg),
        (RxOutcome::Delivered, true)
    );
    assert_eq!(rx.used_idx(), 6);
    // A malformed buffer after good ones: the frame is dropped, all of them returned.
    rx.add_chain(&[(BUFS + 0x3000, 64, true)]);
    rx.add_chain(&[(0x4000_0000, 64, true)]);
    assert_eq!(
        deliver_rx(&mut q, &rx.mem, &mut f, mrg),
        (RxOutcome::Dropped, true)
    );
    assert_eq!(rx.used_idx(), 8);
    assert_eq!((rx.used(6).1, rx.used(7).1), (0, 0));
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let (_rx, mut tx) = drivers();
    let mut q = tx.queue();
    let f = frame(100);
    tx.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let len = f.len() as u32;
    tx.add_chain(&[(0x4000_0000, len, false)]); // outside guest memory
    tx.add_chain(&[(BUFS, len, true)]); // device-writable
    tx.add_chain(&[(BUFS, 20, false)]); // shorter than the headers
    tx.add_chain(&[(BUFS, len, false), (BUFS + 0x1000, 16, true)]); // mixed
    tx.add_chain(&[(BUFS, MAX_FRAME as u32 + 1, false)]); // too large
    tx.write_desc(9, BUFS, 16, NEXT, 9); // loop: 256 x 16 bytes, too short? no: a frame
    tx.publish(9);
    tx.add_chain(&[(BUFS, 12, false), (BUFS + 12, len - 12, false)]); // good
    let mut buf = vec![0u8; MAX_FRAME];
    let mut sent = Vec::new();
    let (used, dropped) = drain_tx(&mut q, &tx.mem, VIRTIO_F_VERSION_1, &mut buf, |fr| {
        sent.push(fr.to_vec())
    });
    assert_eq!(used, 7);
    assert_eq!(dropped, 5);
    assert_eq!(tx.used_idx(), 7);
    // The loop yields 256 readable descriptors (4 KiB): it is a frame as far as the device
    // can tell; the tap or the host stack judge its contents.
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].len(), 256 * 16);
    assert_eq!(sent[1], f);
    // Offloads the guest did not negotiate.
    let mut bad = f.clone();
    bad[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    tx.mem.write_slice(&bad, GuestAddress(BUFS)).unwrap();
    tx.add_chain(&[(BUFS, len, false)]);
    let (_, dropped) = drain_tx(&mut q, &tx.mem, VIRTIO_F_VERSION_1, &mut buf, |_| {
        panic!("must not be sent")
    });
    assert_eq!(dropped, 1);
}

/// Runs `body` on a thread of its own in a private network namespace with tap `name`
/// (down). Skipped (with a message) where taps cannot be made.
fn with_tap(name: &'static str, body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(move || {
        if private_tap(name).is_some() {
            body();
        }
    })
    .join()
    .unwrap();
}

/// Attaches a device to tap `name`, then brings the tap up with 10.9.0.1/24 and the
/// guest's 10.9.0.2 as a permanent neighbour at `GUEST_MAC` (no ARP needed).
fn attach(name: &str) -> Arc<Mutex<Net>> {
    let net = Arc::new(Mutex::new(Net::new(name, GUEST_MAC).unwrap()));
    run_ip(&["link", "set", name, "up"]);
    run_ip(&["addr", "add", "10.9.0.1/24", "dev", name]);
    let mac = GUEST_MAC.to_string();
    run_ip(&[
        "neigh",
        "add",
        "10.9.0.2",
        "lladdr",
        &mac,
        "dev",
        name,
        "nud",
        "permanent",
    ]);
    net
}

type Em = EventManager<Arc<Mutex<Net>>>;

fn event_loop(net: &Arc<Mutex<Net>>) -> Em {
    let mut em = Em::new().unwrap();
    em.add_subscriber(net.clone());
    em
}

/// Runs the event loop until `done` holds (bounded: fails after 10 s).
fn run_until(em: &mut Em, net: &Arc<Mutex<Net>>, what: &str, done: impl Fn(&Net) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(&lock(net)) {
        let n = lock(net);
        let state = (n.stats(), n.rx_len, n.tap_readable);
        drop(n);
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: stats, held frame, tap readable: {state:?}"
        );
        em.run_with_timeout(100).unwrap();
    }
}

/// Runs every pending event without waiting.
fn run_pending(em: &mut Em) {
    while em.run_with_timeout(0).unwrap() > 0 {}
}

fn send_udp(payload: &[u8]) {
    let s = UdpSocket::bind("10.9.0.1:0").unwrap();
    s.send_to(payload, "10.9.0.2:9999").unwrap();
}

/// The UDP payload of a delivered frame (header included), checking its addresses.
fn udp_payload(f: &[u8]) -> &[u8] {
    let eth = &f[VNET_HDR_LEN..];
    assert_eq!(&eth[..6], &GUEST_MAC.0, "destination MAC");
    assert_eq!(&eth[12..14], &[8, 0], "IPv4");
    assert_eq!(&eth[14 + 16..14 + 20], &[10, 9, 0, 2], "destination IP");
    assert_eq!(&eth[14 + 22..14 + 24], &9999u16.to_be_bytes(), "UDP port");
    &eth[14 + 28..]
}

#[test]
fn negotiation_through_the_transport_sets_the_tap_offloads() {
    with_tap("mt-neg0", || {
        let net = attach("mt-neg0");
        let mut em = event_loop(&net);
        let (mut rx, tx) = drivers();
        let dev: Arc<Mutex<dyn VirtioDevice>> = net.clone();
        let mut t = MmioTransport::new(dev, rx.mem.clone(), irq()).unwrap();
        let r = |t: &mut MmioTransport, off| {
            let mut b = [0u8; 4];
            t.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        let w = |t: &mut MmioTransport, off, v: u32| t.write(off, &v.to_le_bytes());
        assert_eq!(r(&mut t, reg::DEVICE_ID), 1);
        let mut mac = [0u8; 6];
        t.read(reg::CONFIG, &mut mac);
        assert_eq!(mac, GUEST_MAC.0);
        let lo = r(&mut t, reg::DEVICE_FEATURES);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        let hi = r(&mut t, reg::DEVICE_FEATURES);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        assert_eq!(offered, OFFERED_FEATURES);
        assert_eq!(offered & bit(17), 0, "no control queue");
        // The driver takes everything offered, as Linux does.
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for (sel, v) in [(0, lo), (1, hi)] {
            w(&mut t, reg::DRIVER_FEATURES_SEL, sel);
            w(&mut t, reg::DRIVER_FEATURES, v);
        }
        w(&mut t, reg::STATUS, 0b1011);
        assert_ne!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        for (sel, base) in [(0, 0x1000u64), (1, TX_BASE)] {
            w(&mut t, reg::QUEUE_SEL, sel);
            w(&mut t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
            w(&mut t, reg::QUEUE_DESC_LOW, base as u32);
            w(&mut t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            w(&mut t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, 0b1111);
        assert_eq!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // The event loop applies TUNSETOFFLOAD (csum, tso4, tso6) before reading frames.
        run_until(&mut em, &net, "the offloads", |n| {
            n.pending_offload.is_none()
        });
        // A UDP datagram from the host stack now reaches the guest with a partial
        // checksum: the tap really has checksum offload on.
        for i in 0..2 {
            rx.add_chain(&[(BUFS + i * 0x1000, 4096, true)]);
        }
        let _ = lock(&net).evts[RXQ].write(1);
        send_udp(b"offloaded");
        run_until(&mut em, &net, "the frame", |n| n.stats().rx_frames == 1);
        let (id, len) = rx.used(0);
        let f = read(&rx, BUFS + u64::from(id) * 0x1000, len);
        assert_eq!(
            f[0],
            VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            "header {:?}",
            &f[..12]
        );
        assert_eq!(u16::from_le_bytes([f[6], f[7]]), 14 + 20, "csum_start");
        assert_eq!(u16::from_le_bytes([f[8], f[9]]), 6, "csum_offset");
        assert_eq!(u16::from_le_bytes([f[10], f[11]]), 1, "num_buffers");
        assert_eq!(udp_payload(&f), b"offloaded");
        drop(tx);
        // A reset turns the offloads off again.
        w(&mut t, reg::STATUS, 0);
        run_until(&mut em, &net, "the reset", |n| n.pending_offload.is_none());
        assert!(lock(&net).active.is_none());
    });
}

#[test]
fn rx_from_a_real_tap_stops_without_buffers_and_resumes_on_notify() {
    with_tap("mt-rx0", || {
        let net = attach("mt-rx0");
        let mut em = event_loop(&net);
        let (mut rx, tx) = drivers();
        // No checksum offload: every frame arrives complete, flags 0.
        let acked = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF);
        lock(&net).activate(ctx(&rx, &tx, acked)).unwrap();
        run_pending(&mut em);
        for i in 0..3u8 {
            send_udp(&[b'a' + i; 100]);
        }
        // The first frame is read and held; the tap is not read further, nothing dropped.
        run_until(&mut em, &net, "a held frame", |n| n.rx_len > 0);
        run_pending(&mut em);
        assert_eq!(lock(&net).stats(), NetStats::default());
        assert_eq!(rx.used_idx(), 0);
        // Buffers and a notification: all three arrive, in order.
        for i in 0..8 {
            rx.add_chain(&[(BUFS + i * 0x1000, 2048, true)]);
        }
        let _ = lock(&net).evts[RXQ].write(1);
        run_until(&mut em, &net, "three frames", |n| n.stats().rx_frames == 3);
        assert_eq!(lock(&net).stats().rx_dropped, 0);
        for i in 0..3u16 {
            let (id, len) = rx.used(i);
            let f = read(&rx, BUFS + u64::from(id) * 0x1000, len);
            assert_eq!(f[0], 0, "flags without GUEST_CSUM");
            assert_eq!(udp_payload(&f), &[b'a' + i as u8; 100][..]);
        }
        // Byte counters: frame bytes, the 12-byte virtio-net header excluded.
        let bytes: u64 = (0..3u16).map(|i| u64::from(rx.used(i).1) - 12).sum();
        let c = lock(&net).counters();
        assert_eq!(c.rx_bytes.load(std::sync::atomic::Ordering::Relaxed), bytes);
        assert_eq!(c.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 3);
    });
}

/// The tap's own MAC address (`ip -o link show`), for frames the host should accept.
fn tap_mac(name: &str) -> MacAddr {
    let out = Command::new("ip")
        .args(["-o", "link", "show", name])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap();
    mac.parse().unwrap()
}

/// An IPv4/UDP frame from the guest (10.9.0.2:7777) to the host (10.9.0.1:port), with a
/// correct IP header checksum and `udp_csum` in the UDP checksum field.
fn udp_frame(dst: MacAddr, port: u16, udp_csum: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + 8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0, 10, 9, 0, 2, 10, 9, 0, 1]);
    let sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut f = dst.0.to_vec();
    f.extend_from_slice(&GUEST_MAC.0);
    f.extend_from_slice(&[8, 0]);
    f.extend(ip);
    f.extend_from_slice(&7777u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&udp_csum.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn tx_reaches_the_host_stack_through_a_real_tap() {
    with_tap("mt-tx0", || {
        let net = attach("mt-tx0");
        let host = UdpSocket::bind("10.9.0.1:7000").unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let dst = tap_mac("mt-tx0");
        let mut em = event_loop(&net);
        let (rx, mut tx) = drivers();
        let acked = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_CSUM);
        lock(&net).activate(ctx(&rx, &tx, acked)).unwrap();
        run_pending(&mut em);
        // 1: no checksum (0 is "none" for UDP over IPv4), header and frame in separate
        // descriptors. 2: NEEDS_CSUM with a bogus checksum field: only a tap that honours
        // the virtio-net header passes it on (as CHECKSUM_PARTIAL, i.e. trusted).
        let f1 = udp_frame(dst, 7000, 0, b"first");
        let mut h2 = hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0);
        h2[6..8].copy_from_slice(&(14u16 + 20).to_le_bytes());
        h2[8..10].copy_from_slice(&6u16.to_le_bytes());
        let mut f2 = h2.to_vec();
        f2.extend(udp_frame(dst, 7000, 0x1234, b"second"));
        tx.mem.write_slice(&hdr(0, 0), GuestAddress(BUFS)).unwrap();
        tx.mem.write_slice(&f1, GuestAddress(BUFS + 0x100)).unwrap();
        tx.mem
            .write_slice(&f2, GuestAddress(BUFS + 0x1000))
            .unwrap();
        tx.add_chain(&[(BUFS, 12, false), (BUFS + 0x100, f1.len() as u32, false)]);
        tx.add_chain(&[(BUFS + 0x1000, f2.len() as u32, false)]);
        let _ = lock(&net).evts[TXQ].write(1);
        run_until(&mut em, &net, "two frames sent", |n| {
            n.stats().tx_frames == 2
        });
        assert_eq!(tx.used_idx(), 2);
        let sent = lock(&net)
            .counters()
            .tx_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(sent, (f1.len() + f2.len() - 12) as u64);
        let mut buf = [0u8; 64];
        for want in [&b"first"[..], b"second"] {
            let (n, from) = host.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
            assert_eq!(from.to_string(), "10.9.0.2:7777");
        }
        // A frame the kernel refuses (a header promising a checksum past the end) is
        // counted as dropped; the queue goes on.
        let mut h3 = h2;
        h3[6..8].copy_from_slice(&5000u16.to_le_bytes());
        tx.mem
            .write_slice(&h3, GuestAddress(BUFS + 0x2000))
            .unwrap();
        tx.mem
            .write_slice(&f1, GuestAddress(BUFS + 0x2000 + 12))
            .unwrap();
        tx.add_chain(&[(BUFS + 0x2000, 12 + f1.len() as u32, false)]);
        let _ = lock(&net).evts[TXQ].write(1);
        run_until(&mut em, &net, "the bad frame", |n| {
            n.stats().tx_dropped == 1
        });
        assert_eq!(tx.used_idx(), 3);
    });
}
