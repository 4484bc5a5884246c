//! Port-forward, host side: the pod's listening TCP ports mirrored as loopback listeners in the
//! pod's network namespace, so that containerd's CRI port-forward — which enters that namespace
//! and dials `localhost:PORT`, IPv4 first, then IPv6 — reaches the workload in the VM.
//!
//! One [`Forwarder`] per pod with a netns path (CRI pods): a task that asks the agent every
//! [`POLL_INTERVAL`] which ports the sandbox listens on (`ListListeningPorts`), binds
//! `127.0.0.1:PORT` and, where the namespace has it, `[::1]:PORT` for each new one (on a thread
//! that joined the netns; the listeners then run on tokio), and closes the listeners of ports that
//! went away (a connection is refused afterwards, as with runc; relays already running go on).
//! Each accepted connection is relayed to the agent's forward port
//! ([`moat_protocol::FORWARD_VSOCK_PORT`]): the header `PORT <n>\n`, the agent's `OK\n` (or
//! `ERR …\n`: the client's connection is reset, like a refused one), then bytes both ways, each
//! direction's end passed on as a half-close.
//!
//! The guest is not trusted: its list is filtered (1–65535, duplicates once, at most
//! [`MAX_PORTS`]), nothing but loopback is ever bound, at most [`MAX_RELAYS`] connections are
//! relayed at once (more are reset), and its replies are bounded
//! ([`moat_protocol::FORWARD_HEADER_MAX`]) and awaited for at most [`GUEST_TIMEOUT`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_protocol::agent as pb;
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::connect::{open_stream, AgentAddress, ConnectError};
use moat_protocol::ttrpc::{self, Code};
use moat_protocol::FORWARD_HEADER_MAX;
use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// How often the agent is asked for the pod's listening ports.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The most ports mirrored for one pod (the lowest ones win).
pub const MAX_PORTS: usize = 128;

/// The most connections relayed at once for one pod.
pub const MAX_RELAYS: usize = 256;

/// How long the guest gets to answer a list request, a connection and its header.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the port-forward machinery (logged; port-forward never fails a pod).
#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    /// The pod's netns cannot be opened or joined.
    #[error("pod network namespace {path}: {what}: {source}")]
    Netns {
        /// The netns path.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The connection to the agent's forward port failed.
    #[error("connecting to the guest: {0}")]
    Guest(#[from] ConnectError),
    /// The guest did not answer in time.
    #[error("the guest did not answer within {GUEST_TIMEOUT:?}")]
    GuestTimeout,
    /// A stream broke.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The agent refused the connection (nothing listens on the port any more, …).
    #[error("the guest refused: {0}")]
    Refused(String),
}

/// The ports of a guest's `ListListeningPorts` answer worth mirroring: 1–65535, each once, the
/// lowest [`MAX_PORTS`]; and how many entries were dropped as out of range or beyond the bound.
pub fn validate_ports(raw: &[u32]) -> (BTreeSet<u16>, usize) {
    let valid: BTreeSet<u16> = raw
        .iter()
        .filter_map(|p| u16::try_from(*p).ok())
        .filter(|p| *p != 0)
        .collect();
    let out_of_range = raw
        .iter()
        .filter(|p| u16::try_from(**p).map_or(true, |p| p == 0))
        .count();
    let over = valid.len().saturating_sub(MAX_PORTS);
    (
        valid.into_iter().take(MAX_PORTS).collect(),
        out_of_range + over,
    )
}

/// A task aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pod's port-forward; dropping it closes every listener and ends every relay.
pub struct Forwarder {
    _task: AbortOnDrop,
}

impl Forwarder {
    /// Starts mirroring the listening ports the pod's agent (`agent`) reports into the netns at
    /// `netns`; connections go to the agent's forward listener at `guest`.
    pub fn spawn(netns: PathBuf, agent: AgentClient, guest: AgentAddress) -> Self {
        Self {
            _task: AbortOnDrop(tokio::spawn(run(netns, agent, guest))),
        }
    }
}

/// A request to the netns thread: bind these ports.
type BindRequest = (Vec<u16>, oneshot::Sender<Vec<(u16, BindResult)>>);

/// The listeners of one port, or why there are none.
type BindResult = Result<Vec<std::net::TcpListener>, String>;

/// A thread inside the pod's netns that binds loopback listeners; it ends when this is dropped.
struct Binder {
    tx: std::sync::mpsc::Sender<BindRequest>,
}

impl Binder {
    /// Starts the thread and waits until it has joined the netns at `path`.
    async fn start(path: &Path) -> Result<Self, PortForwardError> {
        let err = |what| {
            let path = path.to_owned();
            move |source| PortForwardError::Netns { path, what, source }
        };
        let file = File::open(path).map_err(err("opening"))?;
        let (tx, rx) = std::sync::mpsc::channel::<BindRequest>();
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("moat-portfwd".into())
            .spawn(move || {
                if let Err(e) = setns(&file, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(std::io::Error::from(e)));
                    return;
                }
                drop(file);
                let _ = ready_tx.send(Ok(()));
                while let Ok((ports, reply)) = rx.recv() {
                    let bound = ports.into_iter().map(|p| (p, bind_loopback(p))).collect();
                    let _ = reply.send(bound);
                }
            })
            .map_err(err("spawning the netns thread"))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self { tx }),
            Ok(Err(e)) => Err(err("joining")(e)),
            Err(_) => Err(err("joining")(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    /// Binds `ports` in the netns.
    async fn bind(&self, ports: Vec<u16>) -> Vec<(u16, BindResult)> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send((ports, reply)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// Binds `127.0.0.1:port` and `[::1]:port` in the calling thread's netns (a namespace without
/// `::1` gets the IPv4 listener only); non-blocking, for tokio.
fn bind_loopback(port: u16) -> BindResult {
    let mut listeners = Vec::new();
    let mut errors = Vec::new();
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ] {
        match std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            Ok(l)
        }) {
            Ok(l) => listeners.push(l),
            Err(e)
                if addr.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) => {}
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    if listeners.is_empty() {
        return Err(errors.join("; "));
    }
    if !errors.is_empty() {
        debug!("port-forward {port}: {}", errors.join("; "));
    }
    Ok(listeners)
}

/// What the accept loops of a pod share.
struct Shared {
    guest: AgentAddress,
    relays: Arc<Semaphore>,
    /// Closed (its sender dropped) when the forwarder ends: every relay stops.
    stop: watch::Receiver<()>,
}

/// The forwarder's main loop.
async fn run(netns: PathBuf, agent: AgentClient, guest: AgentAddress) {
    let binder = match Binder::start(&netns).await {
        Ok(b) => b,
        Err(e) => {
            warn!("port-forward off: {e}");
            return;
        }
    };
    let (_stop_tx, stop) = watch::channel(());
    let shared = Arc::new(Shared {
        guest,
        relays: Arc::new(Semaphore::new(MAX_RELAYS)),
        stop,
    });
    let mut open: HashMap<u16, Vec<AbortOnDrop>> = HashMap::new();
    let mut warned: HashSet<u16> = HashSet::new();
    let mut warned_list = false;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        "port-forward: mirroring the pod's TCP listeners into {}",
        netns.display()
    );
    loop {
        tick.tick().await;
        let ctx = ttrpc::context::with_timeout(GUEST_TIMEOUT.as_nanos() as i64);
        let reply = tokio::time::timeout(
            GUEST_TIMEOUT,
            agent.list_listening_ports(ctx, &pb::ListListeningPortsRequest::new()),
        )
        .await;
        let raw = match reply {
            Ok(Ok(r)) => r.ports,
            Ok(Err(ttrpc::Error::RpcStatus(s))) if s.code() == Code::UNIMPLEMENTED => {
                warn!("port-forward off: the guest agent does not list ports (older agent)");
                return;
            }
            Ok(Err(e)) => {
                debug!("port-forward: listing the pod's ports: {e}");
                continue;
            }
            Err(_) => {
                debug!("port-forward: listing the pod's ports timed out");
                continue;
            }
        };
        let (ports, dropped) = validate_ports(&raw);
        if dropped > 0 && !warned_list {
            warned_list = true;
            warn!("port-forward: ignored {dropped} of the guest's {} listed ports (out of range or over {MAX_PORTS})", raw.len());
        }
        // Gone from the guest: close (dropping aborts the accept loops and their listeners).
        open.retain(|p, _| ports.contains(p));
        warned.retain(|p| ports.contains(p));
        let new: Vec<u16> = ports
            .iter()
            .filter(|p| !open.contains_key(p))
            .copied()
            .collect();
        if new.is_empty() {
            continue;
        }
        for (port, res) in binder.bind(new).await {
            match res.and_then(|ls| {
                ls.into_iter()
                    .map(|l| TcpListener::from_std(l).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            }) {
                Ok(listeners) => {
                    debug!("port-forward: listening on loopback port {port}");
                    warned.remove(&port);
                    let tasks = listeners
                        .into_iter()
                        .map(|l| AbortOnDrop(tokio::spawn(accept_loop(l, port, shared.clone()))))
                        .collect();
                    open.insert(port, tasks);
                }
                // Retried at the next poll; said once.
                Err(e) if warned.insert(port) => {
                    warn!(
                        "port-forward: cannot listen on loopback port {port} in the pod netns: {e}"
                    )
                }
                Err(e) => debug!("port-forward {port}: {e}"),
            }
        }
    }
}

/// Accepts connections on one listener and starts a relay for each.
async fn accept_loop(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors and the like: a pause so that it does not spin.
                warn!("port-forward {port}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = shared.relays.clone().try_acquire_owned() else {
            warn!("port-forward {port}: {MAX_RELAYS} connections relayed already: resetting one");
            let _ = tcp.set_zero_linger();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut stop = shared.stop.clone();
            tokio::select! {
                r = relay(tcp, &shared.guest, port) => match r {
                    Ok((up, down)) => debug!("port-forward {port}: done ({up} bytes to the guest, {down} back)"),
                    Err(e) => debug!("port-forward {port}: {e}"),
                },
                _ = stop.changed() => {}
            }
        });
    }
}

/// Reads the agent's reply line (bounded, byte by byte: what follows is the connection's data).
async fn read_reply<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, PortForwardError> {
    let mut line = Vec::with_capacity(8);
    loop {
        let b = s.read_u8().await.map_err(|source| PortForwardError::Io {
            what: "reading the guest's reply",
            source,
        })?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b);
        if line.len() >= FORWARD_HEADER_MAX {
            return Err(PortForwardError::Refused("reply line too long".into()));
        }
    }
}

/// Relays `tcp` to the guest's `port`; returns the bytes sent each way.
async fn relay(
    mut tcp: TcpStream,
    guest: &AgentAddress,
    port: u16,
) -> Result<(u64, u64), PortForwardError> {
    let opened = tokio::time::timeout(GUEST_TIMEOUT, async {
        let mut g = open_stream(guest).await?;
        g.write_all(format!("PORT {port}\n").as_bytes())
            .await
            .map_err(|source| PortForwardError::Io {
                what: "sending the header",
                source,
            })?;
        let reply = read_reply(&mut g).await?;
        Ok::<_, PortForwardError>((g, reply))
    })
    .await;
    let (mut g, reply) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = tcp.set_zero_linger();
            return Err(e);
        }
        Err(_) => {
            let _ = tcp.set_zero_linger();
            return Err(PortForwardError::GuestTimeout);
        }
    };
    if reply != "OK" {
        // As if the port had refused: the client sees a reset, not a clean empty stream.
        let _ = tcp.set_zero_linger();
        return Err(PortForwardError::Refused(reply.escape_debug().to_string()));
    }
    tokio::io::copy_bidirectional(&mut tcp, &mut g)
        .await
        .map_err(|source| PortForwardError::Io {
            what: "relaying",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_list_is_filtered() {
        let (p, dropped) = validate_ports(&[80, 0, 65535, 65536, 80, u32::MAX, 22]);
        assert_eq!(p.into_iter().collect::<Vec<_>>(), vec![22, 80, 65535]);
        assert_eq!(dropped, 3);
        let many: Vec<u32> = (1..=1000).rev().collect();
        let (p, dropped) = validate_ports(&many);
        assert_eq!(p.len(), MAX_PORTS);
        assert_eq!(p.first(), Some(&1));
        assert_eq!(p.last(), Some(&(MAX_PORTS as u16)));
        assert_eq!(dropped, 1000 - MAX_PORTS);
        assert_eq!(validate_ports(&[]), (BTreeSet::new(), 0));
    }

    #[tokio::test]
    async fn the_reply_is_bounded() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        b.write_all(&[b'x'; 2 * FORWARD_HEADER_MAX]).await.unwrap();
        assert!(matches!(
            read_reply(&mut a).await,
            Err(PortForwardError::Refused(_))
        ));
        let (mut a, mut b) = tokio::io::duplex(4096);
        b.write_all(b"OK\nbanner").await.unwrap();
        assert_eq!(read_reply(&mut a).await.unwrap(), "OK");
        let mut rest = [0u8; 6];
        a.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"banner");
    }

    /// A fake agent forward port on a Unix socket: answers `reply` to one header, then echoes.
    async fn fake_guest(dir: &Path, reply: &'static [u8]) -> AgentAddress {
        let path = dir.join("fwd.sock");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut header = Vec::new();
                    loop {
                        let b = s.read_u8().await.unwrap();
                        if b == b'\n' {
                            break;
                        }
                        header.push(b);
                    }
                    assert!(header.starts_with(b"PORT "));
                    s.write_all(reply).await.unwrap();
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        AgentAddress::Unix(path)
    }

    #[tokio::test]
    async fn relay_echoes_with_half_close_and_resets_on_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let guest = fake_guest(dir.path(), b"OK\n").await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            relay(tcp, &guest, 8080).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        assert_eq!(server.await.unwrap().unwrap(), (5, 5));

        let dir = tempfile::tempdir().unwrap();
        let guest = fake_guest(dir.path(), b"ERR nothing there\n").await;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            relay(tcp, &guest, 8080).await
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 8];
        let e = c.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
        let e = server.await.unwrap().unwrap_err();
        assert!(e.to_string().contains("nothing there"), "{e}");
    }
}
