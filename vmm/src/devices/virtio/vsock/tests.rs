//! Device-level tests: real guest memory, real Unix sockets, the real event manager.

use super::packet::{op, HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::devices::virtio::testing::Driver;
use crate::devices::virtio::IrqTrigger;
use event_manager::{EventManager, SubscriberOps};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

const CID: u64 = 3;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;

struct Guest {
    em: EventManager<Arc<Mutex<Vsock>>>,
    dev: Arc<Mutex<Vsock>>,
    rx: Driver,
    tx: Driver,
    rx_heads: HashMap<u16, u64>,
    rx_seen: u16,
    tx_next: u64,
    path: std::path::PathBuf,
}

impl Guest {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("moat-vsock-{tag}-{}", std::process::id()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let rx = Driver::with_memory(mem.clone(), 0x1000, 64);
        let tx = Driver::with_memory(mem.clone(), 0x10000, 64);
        let ev = Driver::with_memory(mem.clone(), 0x20000, 64);
        let dev = Arc::new(Mutex::new(Vsock::new(CID, &path).unwrap()));
        dev.lock()
            .unwrap()
            .activate(ActivateContext {
                mem,
                queues: vec![rx.queue(), tx.queue(), ev.queue()],
                acked_features: VIRTIO_F_VERSION_1,
                irq: Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            })
            .unwrap();
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        let mut g = Guest {
            em,
            dev,
            rx,
            tx,
            rx_heads: HashMap::new(),
            rx_seen: 0,
            tx_next: TX_BUFS,
            path,
        };
        for i in 0..32 {
            let addr = RX_BUFS + i * 0x1000;
            let head = g.rx.add_chain(&[(addr, 0x1000, true)]);
            g.rx_heads.insert(head, addr);
        }
        g
    }

    /// Runs the event loop until the device has produced `n` more RX packets.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        for _ in 0..100 {
            if self.rx.used_idx() != self.rx_seen {
                let (id, len) = self.rx.used(self.rx_seen);
                self.rx_seen += 1;
                let addr = self.rx_heads[&(id as u16)];
                let h: Header = self.rx.mem.read_obj(GuestAddress(addr)).unwrap();
                let mut data = vec![0u8; len as usize - HEADER_SIZE];
                self.rx
                    .mem
                    .read_slice(&mut data, GuestAddress(addr + HEADER_SIZE as u64))
                    .unwrap();
                return (h, data);
            }
            self.em.run_with_timeout(50).unwrap();
        }
        panic!("no RX packet from the device");
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        let addr = self.tx_next;
        self.tx_next += 0x1000;
        let mut h = h;
        h.len = payload.len() as u32;
        self.tx
            .mem
            .write_slice(h.as_slice(), GuestAddress(addr))
            .unwrap();
        self.tx
            .mem
            .write_slice(payload, GuestAddress(addr + 0x800))
            .unwrap();
        self.tx.add_chain(&[
            (addr, HEADER_SIZE as u32, false),
            (addr + 0x800, payload.len() as u32, false),
        ]);
        self.kick_tx();
    }

    fn kick_tx(&mut self) {
        self.dev.lock().unwrap().evts[TXQ].write(1).unwrap();
        let before = self.tx.used_idx();
        for _ in 0..100 {
            self.em.run_with_timeout(50).unwrap();
            if self.tx.used_idx() != before {
                return;
            }
        }
        panic!("TX not consumed");
    }

    fn pump(&mut self) {
        self.em.run_with_timeout(50).unwrap();
    }
}

fn guest_hdr(src_port: u32, dst_port: u32, op: u16) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn host_initiated_connection_round_trip() {
    let mut g = Guest::new("host");
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 1024\nearly").unwrap();
    let (req, _) = g.recv();
    assert_eq!({ req.op }, op::REQUEST);
    assert_eq!(
        ({ req.dst_port }, { req.dst_cid }, { req.src_cid }),
        (1024, CID, HOST_CID)
    );
    let host_port = req.src_port;
    assert!(host_port >= 1 << 30);

    g.send(guest_hdr(1024, host_port, op::RESPONSE), &[]);
    let ok = format!("OK {host_port}\n");
    assert_eq!(read_exactly(&mut client, ok.len()), ok.as_bytes());

    // Bytes sent right after the CONNECT line are delivered first.
    let (rw, data) = g.recv();
    assert_eq!({ rw.op }, op::RW);
    assert_eq!(data, b"early");

    client.write_all(b"ping").unwrap();
    let (rw, data) = g.recv();
    assert_eq!(({ rw.op }, { rw.len }), (op::RW, 4));
    assert_eq!(data, b"ping");

    g.send(guest_hdr(1024, host_port, op::RW), b"pong");
    assert_eq!(read_exactly(&mut client, 4), b"pong");

    // Host closes: the guest is told, then resets.
    drop(client);
    let (shut, _) = g.recv();
    assert_eq!({ shut.op }, op::SHUTDOWN);
    assert_eq!({ shut.flags }, SHUTDOWN_SEND);
    // The guest's answer to a closed socket is a reset.
    g.send(guest_hdr(1024, host_port, op::RW), b"late");
    let (rst, _) = g.recv();
    assert_eq!({ rst.op }, op::RST);
    assert_eq!(g.dev.lock().unwrap().muxer.connection_count(), 0);
    // Counters: payload bytes only, control packets counted as packets.
    let c = crate::metrics::CounterSource::snapshot(&*g.dev.lock().unwrap().counters());
    assert_eq!((c["rx_packets"], c["rx_bytes"]), (5, 9), "{c:?}");
    assert_eq!((c["tx_packets"], c["tx_bytes"]), (3, 8), "{c:?}");
}

#[test]
fn guest_initiated_connection_and_refusal() {
    let mut g = Guest::new("guest");
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    g.send(guest_hdr(40000, 5000, op::REQUEST), &[]);
    let (resp, _) = g.recv();
    assert_eq!(
        ({ resp.op }, { resp.src_port }, { resp.dst_port }),
        (op::RESPONSE, 5000, 40000)
    );
    let (mut server, _) = listener.accept().unwrap();
    g.send(guest_hdr(40000, 5000, op::RW), b"hello host");
    assert_eq!(read_exactly(&mut server, 10), b"hello host");
    server.write_all(b"hello guest").unwrap();
    let (rw, data) = g.recv();
    assert_eq!({ rw.op }, op::RW);
    assert_eq!(data, b"hello guest");
    // Guest closes both directions: the device answers with RST and drops the connection.
    let mut shut = guest_hdr(40000, 5000, op::SHUTDOWN);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    let (rst, _) = g.recv();
    assert_eq!({ rst.op }, op::RST);
    assert_eq!(read_exactly(&mut server, 0).len(), 0);
    let mut rest = Vec::new();
    server.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host sees EOF");

    // Nobody listens on port 6000.
    g.send(guest_hdr(40001, 6000, op::REQUEST), &[]);
    let (rst, _) = g.recv();
    assert_eq!(({ rst.op }, { rst.dst_port }), (op::RST, 40001));
    std::fs::remove_file(format!("{}_5000", g.path.display())).unwrap();
}

#[test]
fn malformed_packets_are_dropped() {
    let mut g = Guest::new("bad");
    // Header split short: only 10 bytes.
    g.tx.add_chain(&[(TX_BUFS, 10, false)]);
    g.kick_tx();
    // Payload length beyond the buffers.
    let mut h = guest_hdr(1, 2, op::RW);
    h.len = 5000;
    g.tx.mem
        .write_slice(h.as_slice(), GuestAddress(TX_BUFS))
        .unwrap();
    g.tx.add_chain(&[(TX_BUFS, HEADER_SIZE as u32, false)]);
    g.kick_tx();
    // A writable (wrong direction) descriptor and one outside guest memory.
    g.tx.add_chain(&[(TX_BUFS, 64, true)]);
    g.kick_tx();
    g.tx.add_chain(&[(0x4000_0000, 64, false)]);
    g.kick_tx();
    // Wrong source CID: dropped without answer; data for an unknown connection: RST.
    let mut spoof = guest_hdr(1, 2, op::REQUEST);
    spoof.src_cid = 99;
    g.send(spoof, &[]);
    g.send(guest_hdr(7, 8, op::RW), b"x");
    let (rst, _) = g.recv();
    assert_eq!(
        ({ rst.op }, { rst.dst_port }, { rst.src_port }),
        (op::RST, 7, 8)
    );
    g.pump();
    assert_eq!(g.rx.used_idx(), g.rx_seen, "nothing else sent");
    // Bad CONNECT lines close the host connection.
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"HELLO\n").unwrap();
    client.set_nonblocking(true).unwrap();
    let mut closed = false;
    for _ in 0..100 {
        g.pump();
        match client.read(&mut [0u8; 16]) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => panic!("unexpected {n} bytes"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock),
        }
    }
    assert!(closed, "host connection closed");
    assert_eq!(g.dev.lock().unwrap().muxer.connection_count(), 0);
}

#[test]
fn reserved_cids_are_rejected() {
    let p = std::env::temp_dir().join("moat-vsock-never");
    assert!(matches!(Vsock::new(2, &p), Err(VsockError::Cid(2))));
    assert!(matches!(
        Vsock::new(u64::from(u32::MAX), &p),
        Err(VsockError::Cid(_))
    ));
}

#[test]
fn host_to_guest_data_respects_guest_credit() {
    let mut g = Guest::new("credit");
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    let host_port = req.src_port;
    // The guest accepts but only has room for 10 bytes.
    let mut resp = guest_hdr(1024, host_port, op::RESPONSE);
    resp.buf_alloc = 10;
    g.send(resp, &[]);
    let mut ok = String::new();
    BufReader::new(client.try_clone().unwrap())
        .read_line(&mut ok)
        .unwrap();
    assert!(ok.starts_with("OK "));
    client.write_all(&[b'x'; 100]).unwrap();
    let (rw, data) = g.recv();
    assert_eq!(({ rw.op }, data.len()), (op::RW, 10));
    // Out of credit: the device asks for an update instead of sending more.
    let (cr, _) = g.recv();
    assert_eq!({ cr.op }, op::CREDIT_REQUEST);
    g.pump();
    assert_eq!(g.rx.used_idx(), g.rx_seen, "nothing beyond the credit");
    // The guest consumed the 10 bytes and has room for 1000 more.
    let mut upd = guest_hdr(1024, host_port, op::CREDIT_UPDATE);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 10;
    g.send(upd, &[]);
    let (rw, data) = g.recv();
    assert_eq!(({ rw.op }, data.len()), (op::RW, 90));
    assert!(data.iter().all(|b| *b == b'x'));
}

#[test]
fn guest_to_host_data_is_buffered_and_credited() {
    let mut g = Guest::new("fwd");
    let listener = UnixListener::bind(format!("{}_7000", g.path.display())).unwrap();
    g.send(guest_hdr(41000, 7000, op::REQUEST), &[]);
    let (resp, _) = g.recv();
    assert_eq!({ resp.op }, op::RESPONSE);
    assert_eq!({ resp.buf_alloc }, muxer::TX_BUF_SIZE);
    let (mut server, _) = listener.accept().unwrap();
    // Send more than a quarter of our buffer: the device announces the forwarded bytes.
    let chunk = vec![b'y'; 32 * 1024];
    for _ in 0..3 {
        g.send(guest_hdr(41000, 7000, op::RW), &chunk);
    }
    let got = read_exactly(&mut server, 3 * chunk.len());
    assert!(got.iter().all(|b| *b == b'y'));
    let (upd, _) = g.recv();
    assert_eq!({ upd.op }, op::CREDIT_UPDATE);
    // Announced once a quarter of the buffer (64 KiB) was forwarded.
    assert_eq!({ upd.fwd_cnt }, 2 * 32 * 1024);
    // A guest that ignores our credit gets reset.
    let big = vec![b'z'; 60 * 1024];
    drop(server);
    let mut reset = false;
    for _ in 0..8 {
        g.send(guest_hdr(41000, 7000, op::RW), &big);
        g.pump();
        if g.rx.used_idx() != g.rx_seen {
            let (h, _) = g.recv();
            if h.op == op::RST {
                reset = true;
                break;
            }
        }
    }
    assert!(
        reset,
        "writing to a closed host socket resets the connection"
    );
    std::fs::remove_file(format!("{}_7000", g.path.display())).unwrap();
}

#[test]
fn device_reset_closes_host_connections() {
    let mut g = Guest::new("reset");
    let mut client = UnixStream::connect(&g.path).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    let (req, _) = g.recv();
    g.send(guest_hdr(1024, req.src_port, op::RESPONSE), &[]);
    let mut ok = String::new();
    BufReader::new(client.try_clone().unwrap())
        .read_line(&mut ok)
        .unwrap();
    assert!(ok.starts_with("OK "));
    g.dev.lock().unwrap().reset();
    g.pump();
    assert_eq!(g.dev.lock().unwrap().muxer.connection_count(), 0);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host sees EOF");
}
