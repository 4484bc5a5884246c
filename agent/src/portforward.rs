//! Port-forward, guest side: which TCP ports the sandbox listens on, and the relay that connects
//! a forwarded connection to one of them.
//!
//! containerd's CRI port-forward enters the pod's network namespace on the host and dials
//! `localhost:PORT`; in a moat pod nothing listens there. The shim therefore asks the agent for
//! the sandbox's listening ports ([`listening_ports`], RPC `ListListeningPorts`), mirrors each
//! one as a loopback listener in the pod's netns on the host, and relays every connection it
//! accepts to the agent's forward listener ([`Forwarder`], vsock port
//! [`moat_protocol::FORWARD_VSOCK_PORT`]): one header line `PORT <n>\n`, then the agent connects
//! to `127.0.0.1:<n>` (or `[::1]:<n>`) in the sandbox's network namespace, answers `OK\n` (or
//! `ERR <reason>\n` and closes) and splices both ways, passing each side's end of stream on as a
//! half-close (`shutdown(SHUT_WR)`).
//!
//! The shim is the trusted side, but nothing it sends can crash the agent: the header is bounded
//! ([`moat_protocol::FORWARD_HEADER_MAX`]) and must arrive within [`HEADER_TIMEOUT`], the port
//! must be 1–65535, and at most [`MAX_CONNECTIONS`] forwarded connections exist at a time (one
//! more is answered `ERR busy`).

use std::future::Future;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use moat_protocol::FORWARD_HEADER_MAX;
use nix::sched::{setns, CloneFlags};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::error::{AgentError, Result};

/// How many forwarded connections may exist at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long the shim has to send the header line.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting to the target port may take (it is local: a refusal is immediate).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The most ports [`listening_ports`] reports (the shim bounds its own count below this).
pub const MAX_LISTED_PORTS: usize = 1024;

/// `st` of a socket in LISTEN state in `/proc/net/tcp{,6}` (`TCP_LISTEN`).
const TCP_LISTEN: &str = "0A";

/// Where the forward listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardAddress {
    /// A guest vsock port (any CID), `vsock://-1:PORT` or `vsock://CID:PORT`.
    Vsock {
        /// The CID to bind (`u32::MAX` = any).
        cid: u32,
        /// The port.
        port: u32,
    },
    /// A Unix socket (host tests), `unix:///PATH`.
    Unix(PathBuf),
}

impl ForwardAddress {
    /// Parses `vsock://CID:PORT` (CID `-1` = any) or `unix:///PATH`.
    pub fn parse(s: &str) -> Option<Self> {
        if let Some(p) = s.strip_prefix("unix://") {
            return (!p.is_empty()).then(|| Self::Unix(PathBuf::from(p)));
        }
        let (cid, port) = s.strip_prefix("vsock://")?.split_once(':')?;
        let cid = if cid == "-1" {
            u32::MAX
        } else {
            cid.parse().ok()?
        };
        Some(Self::Vsock {
            cid,
            port: port.parse().ok()?,
        })
    }
}

impl std::fmt::Display for ForwardAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock { cid, port } if *cid == u32::MAX => write!(f, "vsock://-1:{port}"),
            Self::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

// ------------------------------------------------------------------ listening ports

/// Whether a connection to `127.0.0.1` or `::1` reaches a listener bound to `addr`.
fn reachable_from_loopback(addr: std::net::IpAddr) -> bool {
    match addr {
        std::net::IpAddr::V4(a) => a.is_unspecified() || a == Ipv4Addr::LOCALHOST,
        std::net::IpAddr::V6(a) => {
            a.is_unspecified()
                || a == Ipv6Addr::LOCALHOST
                || a.to_ipv4_mapped()
                    .is_some_and(|m| m.is_unspecified() || m == Ipv4Addr::LOCALHOST)
        }
    }
}

/// Decodes the address part of a `/proc/net/tcp{,6}` `local_address` (hex words of the
/// address as the kernel holds it in memory, each printed as a native-endian `u32`).
fn parse_proc_addr(hex: &str) -> Option<std::net::IpAddr> {
    if !hex.is_ascii() || !(hex.len() == 8 || hex.len() == 32) {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for i in (0..hex.len()).step_by(8) {
        let word = u32::from_str_radix(&hex[i..i + 8], 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    Some(match <[u8; 4]>::try_from(bytes.as_slice()) {
        Ok(v4) => std::net::IpAddr::from(v4),
        Err(_) => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?),
    })
}

/// The ports of the LISTEN sockets in the text of a `/proc/net/tcp` or `/proc/net/tcp6` file
/// that a loopback connection reaches, in file order (duplicates kept). Lines that do not
/// parse (the header among them) are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<u16> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _slot = fields.next()?;
            let local = fields.next()?;
            let _remote = fields.next()?;
            if fields.next()? != TCP_LISTEN {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok().filter(|p| *p != 0)?;
            reachable_from_loopback(parse_proc_addr(addr)?).then_some(port)
        })
        .collect()
}

/// The TCP ports the network namespace of process `pid` listens on, reachable over loopback:
/// ascending, each once, at most [`MAX_LISTED_PORTS`].
pub fn listening_ports(pid: i32) -> Result<Vec<u16>> {
    let mut ports = Vec::new();
    for file in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{file}");
        match std::fs::read_to_string(&path) {
            Ok(text) => ports.extend(parse_proc_net_tcp(&text)),
            // No IPv6 in this kernel: no tcp6 file.
            Err(e) if e.kind() == ErrorKind::NotFound && file == "tcp6" => {}
            Err(source) => {
                return Err(AgentError::Io {
                    what: format!("reading {path}"),
                    source,
                })
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_LISTED_PORTS {
        tracing::warn!(
            "the sandbox listens on {} TCP ports: reporting the first {MAX_LISTED_PORTS}",
            ports.len()
        );
        ports.truncate(MAX_LISTED_PORTS);
    }
    Ok(ports)
}

// ------------------------------------------------------------------ the relay

/// Why a forwarded connection failed (logged; the shim gets `ERR <reason>`).
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The header line was malformed or too long.
    #[error("bad header: {0}")]
    BadHeader(String),
    /// The header did not arrive in time.
    #[error("no header within {HEADER_TIMEOUT:?}")]
    HeaderTimeout,
    /// The stream broke.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// There is no sandbox (yet, or any more).
    #[error("no sandbox")]
    NoSandbox,
    /// Joining the sandbox's network namespace to make the socket failed.
    #[error("entering the sandbox network namespace: {0}")]
    Netns(#[source] nix::Error),
    /// Connecting to the target port failed on both loopback addresses.
    #[error("connecting to port {port} in the sandbox: 127.0.0.1: {v4}; ::1: {v6}")]
    Connect {
        /// The port.
        port: u16,
        /// The IPv4 attempt's error.
        v4: std::io::Error,
        /// The IPv6 attempt's error.
        v6: std::io::Error,
    },
}

/// Parses the header line (without its newline): `PORT <n>`, `n` in 1..=65535, digits only.
pub fn parse_header(line: &[u8]) -> std::result::Result<u16, ForwardError> {
    let bad = || ForwardError::BadHeader(String::from_utf8_lossy(line).escape_debug().to_string());
    let digits = line.strip_prefix(b"PORT ").ok_or_else(bad)?;
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let port: u32 = std::str::from_utf8(digits)
        .map_err(|_| bad())?
        .parse()
        .map_err(|_| bad())?;
    u16::try_from(port).ok().filter(|p| *p != 0).ok_or_else(bad)
}

/// Reads one `\n`-terminated line of at most [`FORWARD_HEADER_MAX`] bytes, byte by byte (what
/// follows it belongs to the relayed connection).
async fn read_header<S: AsyncRead + Unpin>(s: &mut S) -> std::result::Result<u16, ForwardError> {
    let mut line = Vec::with_capacity(16);
    loop {
        let b = s.read_u8().await.map_err(|source| ForwardError::Io {
            what: "reading the header",
            source,
        })?;
        if b == b'\n' {
            return parse_header(&line);
        }
        line.push(b);
        if line.len() >= FORWARD_HEADER_MAX {
            return Err(ForwardError::BadHeader(format!(
                "longer than {FORWARD_HEADER_MAX} bytes"
            )));
        }
    }
}

/// Unconnected IPv4 and IPv6 TCP sockets in the network namespace of `pid`. When that is not
/// the agent's own (host tests), they are made on a short-lived thread that joins it: a socket
/// keeps the namespace it was made in wherever it is used.
async fn sockets_in(pid: i32) -> std::result::Result<Sockets, ForwardError> {
    if same_netns(pid) {
        return Ok((TcpSocket::new_v4(), TcpSocket::new_v6()));
    }
    let ns =
        std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|source| ForwardError::Io {
            what: "opening the sandbox network namespace",
            source,
        })?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("moat-fwd-netns".into())
        .spawn(move || {
            let made = setns(&ns, CloneFlags::CLONE_NEWNET)
                .map(|()| (TcpSocket::new_v4(), TcpSocket::new_v6()))
                .map_err(ForwardError::Netns);
            let _ = tx.send(made);
        })
        .map_err(|source| ForwardError::Io {
            what: "spawning the netns thread",
            source,
        })?;
    rx.await.map_err(|_| ForwardError::Io {
        what: "the netns thread",
        source: std::io::Error::from(ErrorKind::BrokenPipe),
    })?
}

/// An IPv4 and an IPv6 socket (either may have failed: a namespace without IPv6).
type Sockets = (std::io::Result<TcpSocket>, std::io::Result<TcpSocket>);

/// Whether process `pid` is in the agent's own network namespace.
fn same_netns(pid: i32) -> bool {
    let id = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (id("/proc/self/ns/net"), id(&format!("/proc/{pid}/ns/net"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// Connects `socket` to `addr` within [`CONNECT_TIMEOUT`].
async fn connect_within(
    socket: std::io::Result<TcpSocket>,
    addr: SocketAddr,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, socket?.connect(addr))
        .await
        .unwrap_or_else(|_| Err(ErrorKind::TimedOut.into()))
}

/// Connects to `127.0.0.1:port`, else `[::1]:port`, in the network namespace of `pid` (as
/// containerd dials `localhost`: IPv4 first).
async fn connect_target(pid: i32, port: u16) -> std::result::Result<TcpStream, ForwardError> {
    let (v4, v6) = sockets_in(pid).await?;
    let v4 = match connect_within(v4, SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(s) => return Ok(s),
        Err(e) => e,
    };
    connect_within(v6, SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
        .await
        .map_err(|v6| ForwardError::Connect { port, v4, v6 })
}

/// Serves one forwarded connection: header, connect, reply, splice.
async fn handle<S, F>(mut s: S, netns_pid: F) -> std::result::Result<(u64, u64), ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Option<i32>>,
{
    let header = tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut s))
        .await
        .map_err(|_| ForwardError::HeaderTimeout)
        .and_then(|r| r);
    let target = match header {
        Ok(port) => match netns_pid.await {
            Some(pid) => connect_target(pid, port).await,
            None => Err(ForwardError::NoSandbox),
        },
        Err(e) => Err(e),
    };
    let mut target = match target {
        Ok(t) => t,
        Err(e) => {
            let reply = format!("ERR {e}");
            let mut reply: String = reply.chars().take(FORWARD_HEADER_MAX - 2).collect();
            reply.retain(|c| c != '\n');
            reply.push('\n');
            let _ = s.write_all(reply.as_bytes()).await;
            let _ = s.shutdown().await;
            return Err(e);
        }
    };
    s.write_all(b"OK\n")
        .await
        .map_err(|source| ForwardError::Io {
            what: "answering the shim",
            source,
        })?;
    // Each direction ends with a shutdown(SHUT_WR) of the other side once its source reached
    // end of stream; an error in either direction ends both.
    tokio::io::copy_bidirectional(&mut s, &mut target)
        .await
        .map_err(|source| ForwardError::Io {
            what: "relaying",
            source,
        })
}

/// Boxed future giving the PID of a process in the sandbox's network namespace.
pub type NetnsLookup =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<i32>> + Send>> + Send + Sync>;

/// The forward listener's task; dropping it stops listening (removing a Unix socket).
pub struct Forwarder {
    task: JoinHandle<()>,
    unix_path: Option<PathBuf>,
}

impl Forwarder {
    /// Binds `addr` and serves forwarded connections into the network namespace `netns` names.
    pub fn start(addr: &ForwardAddress, netns: NetnsLookup) -> Result<Self> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let io = |what: String| move |source| AgentError::Io { what, source };
        let task = match addr {
            ForwardAddress::Vsock { cid, port } => {
                let l = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .map_err(io(format!("binding the port-forward listener {addr}")))?;
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => dispatch(s, &netns, &limit),
                            Err(e) => accept_failed(e).await,
                        }
                    }
                })
            }
            ForwardAddress::Unix(path) => {
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io(format!("removing stale {}", path.display()))(e)),
                }
                let l = tokio::net::UnixListener::bind(path)
                    .map_err(io(format!("binding the port-forward listener {addr}")))?;
                tokio::spawn(async move {
                    loop {
                        match l.accept().await {
                            Ok((s, _)) => dispatch(s, &netns, &limit),
                            Err(e) => accept_failed(e).await,
                        }
                    }
                })
            }
        };
        Ok(Self {
            task,
            unix_path: match addr {
                ForwardAddress::Unix(p) => Some(p.clone()),
                ForwardAddress::Vsock { .. } => None,
            },
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An accept error (e.g. out of descriptors): logged, and a short pause so that a persistent
/// one does not spin.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("port-forward: accept: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Starts a relay for an accepted stream, or refuses it when [`MAX_CONNECTIONS`] are in use.
fn dispatch<S>(mut s: S, netns: &NetnsLookup, limit: &Arc<Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let permit = limit.clone().try_acquire_owned();
    let lookup = netns();
    tokio::spawn(async move {
        let Ok(_permit) = permit else {
            tracing::warn!("port-forward: {MAX_CONNECTIONS} connections in use: refusing one");
            let _ = s.write_all(b"ERR busy\n").await;
            return;
        };
        match handle(s, lookup).await {
            Ok((up, down)) => {
                tracing::debug!("port-forward: connection done ({up} bytes in, {down} out)")
            }
            Err(e) => tracing::debug!("port-forward: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a Linux 6.1 x86_64 guest: sshd-like listener on 0.0.0.0:22, one on
    // 127.0.0.1:8080, one on 10.88.0.2:9000 (not loopback), an established connection from
    // 127.0.0.1:8080, and a TIME_WAIT.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15203 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15291 1 0000000000000000 100 0 0 10 0
   2: 0200580A:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15300 1 0000000000000000 100 0 0 10 0
   3: 0100007F:1F90 0100007F:A0C2 01 00000000:00000000 00:00000000 00000000     0        0 15377 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:A0C4 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
";

    // tcp6: [::]:80, [::1]:5432, [::ffff:127.0.0.1]:6379, [fd00::2]:7000 (not loopback), and
    // an established [::1]:5432 connection.
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000001000000:1538 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 16002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16003 1 0000000000000000 100 0 0 10 0
   3: 000000FD000000000000000002000000:1B58 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 16004 1 0000000000000000 100 0 0 10 0
   4: 00000000000000000000000001000000:1538 00000000000000000000000001000000:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 16005 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_tcp_listeners_reachable_over_loopback() {
        assert_eq!(parse_proc_net_tcp(TCP), vec![22, 8080]);
        assert_eq!(parse_proc_net_tcp(TCP6), vec![80, 5432, 6379]);
    }

    #[test]
    fn proc_net_tcp_garbage_is_skipped() {
        for junk in [
            "",
            "\n\n",
            "0: zz:0016 00000000:0000 0A",
            "0: 00000000:zz 00000000:0000 0A",
            "0: 00000000:0000 00000000:0000 0A",
            "0: 000000:0016 00000000:0000 0A",
            "0: 00000000:0016",
            "0: é0000000:0016 00000000:0000 0A",
            "0: 00000000:10016 00000000:0000 0A",
        ] {
            assert!(parse_proc_net_tcp(junk).is_empty(), "{junk:?}");
        }
    }

    #[test]
    fn the_running_kernels_files_parse() {
        // Live listeners of this test, as this kernel prints them.
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p4 = v4.local_addr().unwrap().port();
        let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        assert!(parse_proc_net_tcp(&tcp).contains(&p4), "{p4} in\n{tcp}");
        // A connected socket's own port is no listener.
        let c = std::net::TcpStream::connect(("127.0.0.1", p4)).unwrap();
        let cp = c.local_addr().unwrap().port();
        let tcp = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        assert!(!parse_proc_net_tcp(&tcp).contains(&cp), "{cp} in\n{tcp}");
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            let p6 = v6.local_addr().unwrap().port();
            let tcp6 = std::fs::read_to_string("/proc/self/net/tcp6").unwrap();
            assert!(parse_proc_net_tcp(&tcp6).contains(&p6), "{p6} in\n{tcp6}");
        }
    }

    #[test]
    fn header_is_strict() {
        assert_eq!(parse_header(b"PORT 80").unwrap(), 80);
        assert_eq!(parse_header(b"PORT 65535").unwrap(), 65535);
        assert_eq!(parse_header(b"PORT 00080").unwrap(), 80);
        for bad in [
            &b"PORT 0"[..],
            b"PORT 65536",
            b"PORT 99999",
            b"PORT 100000",
            b"PORT -1",
            b"PORT +80",
            b"PORT  80",
            b"PORT 80 ",
            b"PORT ",
            b"port 80",
            b"CONNECT 80",
            b"PORT \xff",
            b"",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn header_reader_is_bounded() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        b.write_all(&[b'P'; 4 * FORWARD_HEADER_MAX]).await.unwrap();
        let e = read_header(&mut a).await.unwrap_err();
        assert!(e.to_string().contains("longer than"), "{e}");
        let (mut a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"PORT 8080\nDATA").await.unwrap();
        assert_eq!(read_header(&mut a).await.unwrap(), 8080);
        let mut rest = [0u8; 4];
        a.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"DATA");
        let (mut a, b) = tokio::io::duplex(1024);
        drop(b);
        assert!(read_header(&mut a).await.is_err());
    }

    #[tokio::test]
    async fn no_sandbox_is_answered_err() {
        let (a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(handle(a, async { None }));
        b.write_all(b"PORT 80\n").await.unwrap();
        let mut reply = String::new();
        b.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "ERR no sandbox\n");
        assert!(matches!(
            server.await.unwrap(),
            Err(ForwardError::NoSandbox)
        ));
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            ForwardAddress::parse("vsock://-1:1025"),
            Some(ForwardAddress::Vsock {
                cid: u32::MAX,
                port: 1025
            })
        );
        assert_eq!(
            ForwardAddress::parse("unix:///run/f.sock"),
            Some(ForwardAddress::Unix("/run/f.sock".into()))
        );
        for bad in ["", "unix://", "vsock://x:1", "vsock://1", "tcp://1:2"] {
            assert_eq!(ForwardAddress::parse(bad), None, "{bad}");
        }
        assert_eq!(
            ForwardAddress::parse("vsock://-1:1025")
                .unwrap()
                .to_string(),
            "vsock://-1:1025"
        );
    }
}
