//! Host side of virtio-vsock in the "hybrid" style: guest streams map to Unix sockets.
//!
//! - Host → guest: a client connects to the Unix socket `PATH`, sends `CONNECT <port>\n`;
//!   the muxer asks the guest to connect (REQUEST) from a fresh host port and, when the guest
//!   accepts (RESPONSE), writes `OK <hostport>\n`; from then on the stream carries the data.
//! - Guest → host: a guest REQUEST for host port P is connected to the Unix socket `PATH_P`.
//!
//! Flow control is virtio's credit scheme: we advertise `TX_BUF_SIZE` bytes of buffer and
//! our forwarded count, and only send the guest as much as its advertised buffer allows.
//! Sockets are registered edge-triggered; readiness is remembered in the connection.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};

use super::packet::{op, Header, HEADER_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Buffer we advertise to the guest for guest → host data not yet written to the socket.
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet we send or accept.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 64;

/// Event-loop token (epoll data) of every descriptor the muxer registers: the listener and
/// each host connection. Never a queue index, so the device's event handler can tell them
/// apart from queue notifications without comparing descriptors.
pub const EVENT_TOKEN: u32 = u32::MAX;

/// Registration of `fd` for `set` under [`EVENT_TOKEN`].
fn watch<T: AsRawFd>(fd: &T, set: EventSet) -> Events {
    Events::with_data(fd, EVENT_TOKEN, set)
}

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The socket may have data (edge-triggered readiness not yet consumed).
    readable: bool,
    /// The host side closed its write end.
    host_eof: bool,
    /// The guest will not receive any more.
    peer_rcv_shut: bool,
    /// The guest will not send any more.
    peer_send_shut: bool,
    /// Bytes read from the host before the connection was established.
    stash: Vec<u8>,
    /// Guest → host bytes not yet written to the socket.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are ours (the `OK` line), not guest data.
    tx_uncounted: usize,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Guest bytes written to the socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            readable: true,
            host_eof: false,
            peer_rcv_shut: false,
            peer_send_shut: false,
            stash: Vec::new(),
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
        }
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_to_send(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.peer_rcv_shut
            && (self.readable || !self.stash.is_empty())
    }

    /// Writes as much of `tx_buf` as the socket takes. Err on a broken socket.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    self.fwd_cnt += (n - ours) as u32;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() && self.peer_send_shut {
            // The guest is done sending: pass the half-close on.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host connection that has not sent its `CONNECT` line yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The Unix socket could not be created.
    #[error("cannot listen on vsock Unix socket {path}: {err}")]
    Listen {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        err: std::io::Error,
    },
}

/// All host-side vsock connections of one device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    pending: HashMap<RawFd, Pending>,
    ctrl: VecDeque<Header>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket file) for guest CID `guest_cid`.
    pub fn new(uds_path: &Path, guest_cid: u64) -> Result<Self, MuxerError> {
        let listen_err = |err| MuxerError::Listen {
            path: uds_path.display().to_string(),
            err,
        };
        match std::fs::remove_file(uds_path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            ctrl: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// The listening socket's fd.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Registers the listener with the event loop.
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(watch(&self.listener, EventSet::IN)) {
            tracing::error!("vsock: cannot register listener: {e:?}");
        }
    }

    fn header(&self, key: Key, op: u16) -> Header {
        let fwd = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: fwd,
        }
    }

    fn queue_ctrl(&mut self, key: Key, op: u16) {
        let h = self.header(key, op);
        self.ctrl.push_back(h);
    }

    fn remove(&mut self, key: Key, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.by_fd.remove(&fd);
            if let Err(e) = ops.remove(Events::empty(&c.stream)) {
                tracing::warn!("vsock: cannot unregister connection: {e:?}");
            }
        }
    }

    fn reset(&mut self, key: Key, ops: &mut EventOps) {
        self.queue_ctrl(key, op::RST);
        self.remove(key, ops);
    }

    fn insert(&mut self, key: Key, conn: Conn) {
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
    }

    /// Whether `fd` belongs to this muxer.
    pub fn owns(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd()
            || self.by_fd.contains_key(&fd)
            || self.pending.contains_key(&fd)
    }

    /// Handles readiness of one of our fds.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet, ops: &mut EventOps) {
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if self.pending.contains_key(&fd) {
            self.read_connect_line(fd, ops);
        } else if let Some(key) = self.by_fd.get(&fd).copied() {
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            if set.intersects(
                EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
            ) {
                c.readable = true;
            }
            if set.contains(EventSet::OUT) || set.contains(EventSet::ERROR) {
                self.flush(key, ops);
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!("vsock: dropping host connection: {e}");
                        continue;
                    }
                    let ev = watch(&stream, EventSet::IN | EventSet::EDGE_TRIGGERED);
                    if let Err(e) = ops.add(ev) {
                        tracing::warn!("vsock: cannot register host connection: {e:?}");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    self.pending.insert(
                        fd,
                        Pending {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn drop_pending(&mut self, fd: RawFd, ops: &mut EventOps, why: &str) {
        if let Some(p) = self.pending.remove(&fd) {
            tracing::warn!("vsock: closing host connection: {why}");
            let _ = ops.remove(Events::empty(&p.stream));
        }
    }

    fn read_connect_line(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let newline = loop {
            if let Some(i) = p.line.iter().position(|b| *b == b'\n') {
                break i;
            }
            if p.line.len() > MAX_CONNECT_LINE {
                return self.drop_pending(fd, ops, "CONNECT line too long");
            }
            match p.stream.read(&mut buf) {
                Ok(0) => return self.drop_pending(fd, ops, "closed before CONNECT"),
                Ok(n) => p.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.drop_pending(fd, ops, &e.to_string()),
            }
        };
        let port = std::str::from_utf8(&p.line[..newline])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|n| n.trim().parse::<u32>().ok());
        let Some(peer_port) = port else {
            return self.drop_pending(fd, ops, "expected `CONNECT <port>`");
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.modify(watch(&p.stream, events)) {
            tracing::warn!("vsock: cannot watch host connection: {e:?}");
            let _ = ops.remove(Events::empty(&p.stream));
            return;
        }
        let local_port = self.allocate_port(peer_port);
        let mut conn = Conn::new(p.stream, State::AwaitingResponse);
        conn.stash = p.line[newline + 1..].to_vec();
        let key = (local_port, peer_port);
        self.insert(key, conn);
        self.queue_ctrl(key, op::REQUEST);
    }

    fn allocate_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    fn flush(&mut self, key: Key, ops: &mut EventOps) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = c.flush() {
            tracing::debug!("vsock: host socket for {key:?} broke: {e}");
            return self.reset(key, ops);
        }
        if (c.fwd_cnt - c.fwd_cnt_sent).0 >= TX_BUF_SIZE / 4 {
            self.queue_ctrl(key, op::CREDIT_UPDATE);
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, h: Header, payload: &[u8], ops: &mut EventOps) {
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            guest_warn!(
                "vsock: dropping packet from cid {} to cid {} type {}",
                { h.src_cid },
                { h.dst_cid },
                { h.type_ }
            );
            if h.op != op::RST && h.src_cid == self.guest_cid {
                self.queue_ctrl(key, op::RST);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            match h.op {
                op::REQUEST => self.connect_to_host(key, &h, ops),
                op::RST => {}
                _ => self.queue_ctrl(key, op::RST),
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match h.op {
            op::RESPONSE if c.state == State::AwaitingResponse => {
                c.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                c.tx_uncounted += ok.len();
                c.tx_buf.extend(ok.as_bytes());
                self.flush(key, ops);
            }
            op::RW if c.state == State::Established => {
                if c.tx_buf.len() + payload.len() > TX_BUF_SIZE as usize + c.tx_uncounted {
                    guest_warn!("vsock: guest overran its credit on {key:?}");
                    return self.reset(key, ops);
                }
                c.tx_buf.extend(payload);
                self.flush(key, ops);
            }
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.queue_ctrl(key, op::CREDIT_UPDATE),
            op::SHUTDOWN => {
                c.peer_rcv_shut |= h.flags & SHUTDOWN_RCV != 0;
                c.peer_send_shut |= h.flags & SHUTDOWN_SEND != 0;
                if c.peer_rcv_shut && c.peer_send_shut {
                    let _ = c.flush();
                    self.reset(key, ops);
                } else {
                    self.flush(key, ops);
                }
            }
            op::RST => self.remove(key, ops),
            other => {
                guest_warn!("vsock: unexpected op {other} on {key:?}");
                self.reset(key, ops);
            }
        }
    }

    fn connect_to_host(&mut self, key: Key, request: &Header, ops: &mut EventOps) {
        let path = format!("{}_{}", self.uds_path.display(), key.0);
        let stream = UnixStream::connect(&path).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        let stream = stream.and_then(|s| {
            ops.add(watch(&s, events)).map_err(std::io::Error::other)?;
            Ok(s)
        });
        match stream {
            Ok(stream) => {
                let mut conn = Conn::new(stream, State::Established);
                conn.peer_buf_alloc = request.buf_alloc;
                conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
                self.insert(key, conn);
                self.queue_ctrl(key, op::RESPONSE);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path} refused: {e}");
                self.queue_ctrl(key, op::RST);
            }
        }
    }

    /// Closes every connection (the driver went away); pending packets are dropped.
    pub fn close_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, ops);
        }
        for (_, p) in self.pending.drain() {
            let _ = ops.remove(Events::empty(&p.stream));
        }
        self.ctrl.clear();
    }

    /// Whether there is something to send to the guest.
    pub fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.wants_to_send() && (c.peer_credit() > 0 || !c.credit_requested))
    }

    /// Writes the next packet for the guest into `w` (a device-writable chain). Returns the
    /// bytes written, or `None` when there is nothing to send after all.
    pub fn fill_rx(
        &mut self,
        w: &mut virtio_queue::Writer<'_>,
        ops: &mut EventOps,
    ) -> Option<usize> {
        if w.available_bytes() < HEADER_SIZE {
            guest_warn!("vsock: guest RX buffer smaller than a header");
            return Some(0);
        }
        if let Some(h) = self.ctrl.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                c.fwd_cnt_sent = Wrapping(h.fwd_cnt);
            }
            return Some(write_packet(w, &h, &[]));
        }
        let room = (w.available_bytes() - HEADER_SIZE).min(MAX_PAYLOAD);
        if room == 0 {
            // A header-only buffer cannot carry data (and a 0-byte read would look like EOF).
            return None;
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_to_send())
            .map(|(k, _)| *k)
            .collect();
        let mut buf = vec![0u8; room];
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            let credit = c.peer_credit() as usize;
            if credit == 0 {
                if !c.credit_requested {
                    c.credit_requested = true;
                    let h = self.header(key, op::CREDIT_REQUEST);
                    return Some(write_packet(w, &h, &[]));
                }
                continue;
            }
            let want = room.min(credit);
            let read = if !c.stash.is_empty() {
                let n = want.min(c.stash.len());
                buf[..n].copy_from_slice(&c.stash[..n]);
                c.stash.drain(..n);
                Ok(n)
            } else {
                c.stream.read(&mut buf[..want])
            };
            match read {
                Ok(0) => {
                    // The host shut its write side (or closed): it sends no more. Whether it
                    // still receives shows when the guest writes (EPIPE turns into a reset).
                    c.host_eof = true;
                    let mut h = self.header(key, op::SHUTDOWN);
                    h.flags = SHUTDOWN_SEND;
                    return Some(write_packet(w, &h, &[]));
                }
                Ok(n) => {
                    c.rx_cnt += n as u32;
                    let mut h = self.header(key, op::RW);
                    h.len = n as u32;
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.fwd_cnt_sent = Wrapping(h.fwd_cnt);
                    }
                    return Some(write_packet(w, &h, &buf[..n]));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("vsock: host socket for {key:?} broke: {e}");
                    let h = self.header(key, op::RST);
                    self.remove(key, ops);
                    return Some(write_packet(w, &h, &[]));
                }
            }
        }
        None
    }

    /// Number of live connections (for tests and the control API).
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending.len()
    }
}

fn write_packet(w: &mut virtio_queue::Writer<'_>, h: &Header, payload: &[u8]) -> usize {
    use vm_memory::ByteValued;
    match w
        .write_all(h.as_slice())
        .and_then(|()| w.write_all(payload))
    {
        Ok(()) => HEADER_SIZE + payload.len(),
        Err(e) => {
            guest_warn!("vsock: cannot write packet to guest: {e}");
            0
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
