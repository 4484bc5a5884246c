//! Opening an `Agent` client: over a plain Unix socket (agent run on the
//! host, tests) or over the VMM's hybrid-vsock Unix socket (Firecracker
//! style: the client sends `CONNECT <port>\n`, the VMM answers
//! `OK <host port>\n`, and from then on the stream is the guest connection).
//!
//! Both a blocking ([`connect_sync`]) and a tokio ([`connect`]) flavour are
//! provided; the async one retries until a deadline because the agent only
//! starts listening once the guest has booted.

use std::io::{Read, Write};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent_ttrpc::AgentClient as SyncAgentClient;
use crate::agent_ttrpc_async::AgentClient as AsyncAgentClient;

/// Longest handshake reply accepted (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

/// Errors from connecting to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address string could not be parsed.
    #[error("invalid agent address {0:?}: expected unix:///PATH or hvsock:///PATH:PORT")]
    BadAddress(String),
    /// Connecting to or talking on the Unix socket failed.
    #[error("{what} on {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The Unix socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM rejected or garbled the hybrid-vsock handshake.
    #[error("hybrid vsock handshake on {path} for port {port} failed: {reason} (is the agent listening in the guest?)")]
    Handshake {
        /// The VMM's Unix socket.
        path: PathBuf,
        /// Guest port asked for.
        port: u32,
        /// What went wrong.
        reason: String,
    },
    /// The deadline passed before a connection was made.
    #[error("agent at {address} not reachable within {timeout:?}; last error: {last}")]
    Timeout {
        /// Where we tried.
        address: String,
        /// The deadline.
        timeout: Duration,
        /// The last error seen.
        last: Box<ConnectError>,
    },
    /// ttrpc refused the connected stream.
    #[error("ttrpc client setup: {0}")]
    Ttrpc(#[from] ttrpc::Error),
}

/// Where the agent can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// A Unix socket the agent itself listens on.
    Unix(PathBuf),
    /// A VMM hybrid-vsock Unix socket and the guest port behind it.
    HybridVsock {
        /// The VMM's Unix socket (`moat-vmm --vsock-uds`).
        uds: PathBuf,
        /// Guest vsock port (normally [`crate::AGENT_VSOCK_PORT`]).
        port: u32,
    },
}

impl AgentAddress {
    /// Parses `unix:///PATH` or `hvsock:///PATH:PORT`.
    pub fn parse(s: &str) -> Result<Self, ConnectError> {
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(ConnectError::BadAddress(s.to_owned()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| ConnectError::BadAddress(s.to_owned()))?;
            let port = port
                .parse()
                .map_err(|_| ConnectError::BadAddress(s.to_owned()))?;
            if path.is_empty() {
                return Err(ConnectError::BadAddress(s.to_owned()));
            }
            return Ok(Self::HybridVsock {
                uds: PathBuf::from(path),
                port,
            });
        }
        Err(ConnectError::BadAddress(s.to_owned()))
    }
}

impl std::fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
            Self::HybridVsock { uds, port } => write!(f, "hvsock://{}:{port}", uds.display()),
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ConnectError {
    let path = path.to_owned();
    move |source| ConnectError::Io { what, path, source }
}

/// Parses the VMM's reply line (without the newline).
fn parse_reply(line: &[u8], path: &Path, port: u32) -> Result<u32, ConnectError> {
    let bad = |reason: String| ConnectError::Handshake {
        path: path.to_owned(),
        port,
        reason,
    };
    let text = std::str::from_utf8(line).map_err(|_| bad("reply is not UTF-8".into()))?;
    let n = text
        .strip_prefix("OK ")
        .ok_or_else(|| bad(format!("unexpected reply {text:?}")))?;
    n.trim()
        .parse()
        .map_err(|_| bad(format!("bad host port in reply {text:?}")))
}

/// Performs the hybrid-vsock handshake on a blocking stream; returns the
/// host-side port the VMM assigned. Reads byte by byte so that no byte of
/// the ttrpc stream that follows is consumed.
pub fn hybrid_handshake_sync<S: Read + Write>(
    stream: &mut S,
    path: &Path,
    port: u32,
) -> Result<u32, ConnectError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(io_err("sending CONNECT", path))?;
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        let n = stream
            .read(&mut byte)
            .map_err(io_err("reading handshake reply", path))?;
        if n == 0 {
            return Err(ConnectError::Handshake {
                path: path.to_owned(),
                port,
                reason: "connection closed before the reply".into(),
            });
        }
        if byte[0] == b'\n' {
            return parse_reply(&line, path, port);
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err(ConnectError::Handshake {
                path: path.to_owned(),
                port,
                reason: "reply line too long".into(),
            });
        }
    }
}

/// Async flavour of [`hybrid_handshake_sync`].
pub async fn hybrid_handshake<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    path: &Path,
    port: u32,
) -> Result<u32, ConnectError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(io_err("sending CONNECT", path))?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(io_err("reading handshake reply", path))?;
        if n == 0 {
            return Err(ConnectError::Handshake {
                path: path.to_owned(),
                port,
                reason: "connection closed before the reply".into(),
            });
        }
        if byte[0] == b'\n' {
            return parse_reply(&line, path, port);
        }
        line.push(byte[0]);
        if line.len() > MAX_REPLY {
            return Err(ConnectError::Handshake {
                path: path.to_owned(),
                port,
                reason: "reply line too long".into(),
            });
        }
    }
}

/// Opens the raw stream to the agent (handshake done), blocking.
pub fn open_stream_sync(
    addr: &AgentAddress,
    timeout: Duration,
) -> Result<std::os::unix::net::UnixStream, ConnectError> {
    match addr {
        AgentAddress::Unix(path) => std::os::unix::net::UnixStream::connect(path)
            .map_err(io_err("connecting to the agent socket", path)),
        AgentAddress::HybridVsock { uds, port } => {
            let mut s = std::os::unix::net::UnixStream::connect(uds)
                .map_err(io_err("connecting to the VMM vsock socket", uds))?;
            s.set_read_timeout(Some(timeout))
                .map_err(io_err("setting a read timeout", uds))?;
            hybrid_handshake_sync(&mut s, uds, *port)?;
            s.set_read_timeout(None)
                .map_err(io_err("clearing the read timeout", uds))?;
            Ok(s)
        }
    }
}

/// Connects a blocking client (one attempt; the handshake reply is awaited
/// for at most `timeout`).
pub fn connect_sync(
    addr: &AgentAddress,
    timeout: Duration,
) -> Result<SyncAgentClient, ConnectError> {
    let stream = open_stream_sync(addr, timeout)?;
    let client = ttrpc::Client::new(stream.into_raw_fd())?;
    Ok(SyncAgentClient::new(client))
}

/// Opens the raw stream to the agent (handshake done), asynchronously.
pub async fn open_stream(addr: &AgentAddress) -> Result<tokio::net::UnixStream, ConnectError> {
    match addr {
        AgentAddress::Unix(path) => tokio::net::UnixStream::connect(path)
            .await
            .map_err(io_err("connecting to the agent socket", path)),
        AgentAddress::HybridVsock { uds, port } => {
            let mut s = tokio::net::UnixStream::connect(uds)
                .await
                .map_err(io_err("connecting to the VMM vsock socket", uds))?;
            hybrid_handshake(&mut s, uds, *port).await?;
            Ok(s)
        }
    }
}

/// Connects an async client, retrying (the guest may still be booting)
/// until `timeout` has passed.
pub async fn connect(
    addr: &AgentAddress,
    timeout: Duration,
) -> Result<AsyncAgentClient, ConnectError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        let attempt = tokio::time::timeout(remaining, open_stream(addr)).await;
        let last = match attempt {
            Ok(Ok(stream)) => {
                let socket = ttrpc::asynchronous::transport::Socket::from(stream);
                return Ok(AsyncAgentClient::new(ttrpc::asynchronous::Client::new(
                    socket,
                )));
            }
            Ok(Err(e)) => e,
            Err(_) => ConnectError::Io {
                what: "connecting",
                path: PathBuf::from(addr.to_string()),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            },
        };
        if start.elapsed() + backoff >= timeout {
            return Err(ConnectError::Timeout {
                address: addr.to_string(),
                timeout,
                last: Box::new(last),
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            AgentAddress::parse("unix:///run/a.sock").unwrap(),
            AgentAddress::Unix("/run/a.sock".into())
        );
        assert_eq!(
            AgentAddress::parse("hvsock:///run/v.sock:1024").unwrap(),
            AgentAddress::HybridVsock {
                uds: "/run/v.sock".into(),
                port: 1024
            }
        );
        for bad in [
            "",
            "unix://",
            "hvsock:///x",
            "hvsock://:1",
            "tcp://x",
            "hvsock:///x:y",
        ] {
            assert!(AgentAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn handshake_reads_exactly_the_reply() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let vmm = std::thread::spawn(move || {
            let mut got = [0u8; 13];
            b.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"CONNECT 1024\n");
            b.write_all(b"OK 52\nPAYLOAD").unwrap();
        });
        let port = hybrid_handshake_sync(&mut a, Path::new("/x"), 1024).unwrap();
        assert_eq!(port, 52);
        vmm.join().unwrap();
        let mut rest = [0u8; 7];
        a.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"PAYLOAD");
    }

    #[test]
    fn handshake_rejects_refusal_and_eof() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.write_all(b"ERR no listener\n").unwrap();
        let e = hybrid_handshake_sync(&mut a, Path::new("/x"), 1024).unwrap_err();
        assert!(e.to_string().contains("unexpected reply"), "{e}");
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let e = hybrid_handshake_sync(&mut a, Path::new("/x"), 1024).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }

    #[tokio::test]
    async fn async_handshake_and_timeout() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let vmm = tokio::spawn(async move {
            let mut got = [0u8; 11];
            b.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"CONNECT 77\n");
            b.write_all(b"OK 9\n").await.unwrap();
        });
        assert_eq!(
            hybrid_handshake(&mut a, Path::new("/x"), 77).await.unwrap(),
            9
        );
        vmm.await.unwrap();

        let dir = std::env::temp_dir().join(format!("moat-proto-test-{}", std::process::id()));
        let addr = AgentAddress::Unix(dir.join("absent.sock"));
        let Err(e) = connect(&addr, Duration::from_millis(50)).await else {
            panic!("connected to an absent socket");
        };
        assert!(matches!(e, ConnectError::Timeout { .. }), "{e}");
    }
}
