//! Item 5, bulk TCP throughput of a pod, moat against runc in the same setup: a network
//! namespace made like CNI's bridge plugin makes one (`moat_e2e::netns`: a veth pair, the pod end
//! `eth0` 10.88.0.2/24 in the namespace, 10.88.0.1/24 in the root namespace) is handed to a busybox
//! container with `ctr run --with-ns network:PATH`. runc's container uses the veth directly; moat's
//! microVM gets a virtio-net NIC behind the shim's tap + tc redirect.
//!
//! Each repetition starts one container per runtime that first sends `bytes` of zeros to a
//! receiver in this process on 10.88.0.1 (`dd if=/dev/zero | nc`: pod → host), then receives as
//! many from this process (`nc -l > /dev/null`: host → pod). The receiver times its first byte to
//! its last; the sender times connect to the pod's close after everything was sent. Both rates are
//! in MB/s (10^6 bytes per second).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use moat_e2e::containerd::{Containerd, CTR_LIMIT, IMAGE, RUNTIME};
use moat_e2e::netns::{PodNetns, HOST_IP, POD_IP};

use crate::stats::{median, ratio, show};
use crate::Report;

/// The runtime containerd uses for runc.
const RUNC: &str = "io.containerd.runc.v2";
/// The namespace and host-side veth of the benchmark (distinct from the E2E trial's).
const NETNS: &str = "moat-bench-net";
const HOST_IF: &str = "moatbench0";
/// The host's receiver (pod → host) and the pod's receiver (host → pod).
const UP_PORT: u16 = 18091;
const DOWN_PORT: u16 = 18092;
/// `dd`'s block size in the container, and the unit of the transfer size.
const BLOCK: u64 = 64 * 1024;
/// How long the pod gets to boot and connect, and one transfer to make progress (TCG is slow).
const LIMIT: Duration = Duration::from_secs(300);

/// Errors of the network benchmark.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Setup(String),
    #[error("listen on {HOST_IP}:{UP_PORT}: {0}")]
    Listen(io::Error),
    #[error("start ctr: {0}")]
    Spawn(io::Error),
    #[error("pod → host ({runtime}): {what}\nctr stderr:\n{stderr}\ncontainerd log:\n{log}")]
    Upload {
        runtime: &'static str,
        what: String,
        stderr: String,
        log: String,
    },
    #[error("host → pod ({runtime}): {what}\nctr stderr:\n{stderr}\ncontainerd log:\n{log}")]
    Download {
        runtime: &'static str,
        what: String,
        stderr: String,
        log: String,
    },
    #[error("`ctr run` of {id} ({runtime}) failed ({status}); stderr:\n{stderr}")]
    Ctr {
        id: String,
        runtime: &'static str,
        status: String,
        stderr: String,
    },
}

impl From<moat_e2e::Failed> for NetError {
    fn from(f: moat_e2e::Failed) -> Self {
        NetError::Setup(f.message().unwrap_or("setup failed").to_owned())
    }
}

/// Why a receiver stopped short.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("connection closed after {got} of {want} bytes")]
    Short { got: u64, want: u64 },
    #[error("read after {got} of {want} bytes: {source}")]
    Read {
        got: u64,
        want: u64,
        source: io::Error,
    },
}

/// Reads exactly `want` bytes from `r`; returns the bytes counted and the time from the end of the
/// first read to the end of the last one. The first read's bytes are left out of the count, so
/// `rate_mb_s` of the result is the rate over the timed interval alone.
pub fn receive(mut r: impl Read, want: u64) -> Result<(u64, Duration), RecvError> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    while got < want {
        let n = match r.read(&mut buf) {
            Ok(0) => return Err(RecvError::Short { got, want }),
            Ok(n) => n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(RecvError::Read { got, want, source }),
        };
        got += n;
        first.get_or_insert((Instant::now(), got));
    }
    let (t0, before) = first.unwrap_or((Instant::now(), 0));
    Ok((got - before, t0.elapsed()))
}

/// `bytes` over `elapsed` in MB/s (10^6 bytes per second); `None` for an empty interval.
pub fn rate_mb_s(bytes: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| bytes as f64 / 1e6 / secs)
}

/// The number of `dd` blocks for a transfer of `mib` MiB.
pub fn blocks(mib: u64) -> u64 {
    mib * 1024 * 1024 / BLOCK
}

/// The container's script: listen for the host's transfer in the background, send `count` blocks
/// of zeros to the host, then wait for the listener (it exits when the host closes).
fn script(count: u64) -> String {
    format!(
        "nc -l -p {DOWN_PORT} </dev/null >/dev/null & \
         dd if=/dev/zero bs={BLOCK} count={count} 2>/dev/null | nc {HOST_IP} {UP_PORT}; wait"
    )
}

/// One transfer each way: (pod → host MB/s, host → pod MB/s).
struct Sample {
    up: f64,
    down: f64,
}

/// Sends `bytes` zeros to the pod's listener, retrying the connection while the listener is not
/// up yet, then waits for the pod to close; the rate is over connect → close.
fn send_to_pod(bytes: u64) -> Result<f64, String> {
    let addr: SocketAddr = (
        POD_IP
            .parse::<std::net::IpAddr>()
            .map_err(|e| e.to_string())?,
        DOWN_PORT,
    )
        .into();
    let deadline = Instant::now() + LIMIT;
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(30)) {
            Ok(s) => break s,
            // The pod's `nc -l` is started before its upload, so this is rare: poll briefly.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("connect to {addr}: {e}")),
        }
    };
    let t0 = Instant::now();
    s.set_write_timeout(Some(LIMIT))
        .and_then(|()| s.set_read_timeout(Some(LIMIT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    let chunk = vec![0u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])
            .map_err(|e| format!("send after {} of {bytes} bytes: {e}", bytes - left))?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the pod to close: {e}"))?;
    rate_mb_s(bytes, t0.elapsed()).ok_or_else(|| "empty interval".to_owned())
}

/// Kills and removes container `id` (after a failure; a finished `ctr run --rm` removed it).
fn remove(c: &Containerd, id: &str, child: &mut Child) {
    let _ = c.run_ctr(&["task", "kill", "-s", "KILL", id]);
    let _ = child.kill();
    let _ = child.wait();
    let _ = c.run_ctr(&["task", "delete", "--force", id]);
    let _ = c.run_ctr(&["container", "delete", id]);
}

/// The stderr of a finished (or killed) `ctr`.
fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// One repetition for `runtime`: a container in the benchmark's netns transfers `bytes` each way.
fn one(
    c: &Containerd,
    ns: &PodNetns,
    listener: &TcpListener,
    runtime: &'static str,
    id: &str,
    mib: u64,
) -> Result<Sample, NetError> {
    let bytes = blocks(mib) * BLOCK;
    let accept = listener.try_clone().map_err(NetError::Listen)?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let res = accept
            .accept()
            .map_err(|e| format!("accept: {e}"))
            .and_then(|(s, _)| {
                s.set_read_timeout(Some(LIMIT))
                    .map_err(|e| format!("set timeout: {e}"))?;
                receive(&s, bytes).map_err(|e| e.to_string())
            });
        let _ = tx.send(res);
    });
    let with_ns = format!("network:{}", ns.path());
    let mut child = Command::new("timeout")
        .arg(CTR_LIMIT.to_string())
        .arg("ctr")
        .arg("--address")
        .arg(&c.socket)
        .args(["run", "--rm", "--runtime", runtime, "--with-ns", &with_ns])
        .args([IMAGE, id, "sh", "-c", &script(blocks(mib))])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetError::Spawn)?;
    // The receiver thread ends on its own: accept and every read are bounded by `LIMIT` except
    // the accept itself, which a failed run leaves pending; the item stops at the first failure.
    let up = match rx.recv_timeout(LIMIT * 2) {
        Ok(Ok((counted, elapsed))) => {
            rate_mb_s(counted, elapsed).ok_or_else(|| "empty interval".to_owned())
        }
        Ok(Err(what)) => Err(what),
        Err(_) => Err(format!(
            "nothing arrived within {} s",
            (LIMIT * 2).as_secs()
        )),
    };
    let up = match up {
        Ok(r) => r,
        Err(what) => {
            remove(c, id, &mut child);
            return Err(NetError::Upload {
                runtime,
                what: format!("{bytes} bytes to {HOST_IP}:{UP_PORT}: {what}"),
                stderr: stderr_of(&mut child),
                log: c.log_tail(),
            });
        }
    };
    let down = match send_to_pod(bytes) {
        Ok(r) => r,
        Err(what) => {
            remove(c, id, &mut child);
            return Err(NetError::Download {
                runtime,
                what,
                stderr: stderr_of(&mut child),
                log: c.log_tail(),
            });
        }
    };
    let status = child.wait().map_err(NetError::Spawn)?;
    if !status.success() {
        let stderr = stderr_of(&mut child);
        remove(c, id, &mut child);
        return Err(NetError::Ctr {
            id: id.to_owned(),
            runtime,
            status: status.to_string(),
            stderr,
        });
    }
    Ok(Sample { up, down })
}

/// Item 5: bulk TCP throughput pod → host and host → pod, moat against runc, `mib` MiB each way.
pub fn run(reps: usize, mib: u64, report: &mut Report) -> Result<(), NetError> {
    let c = Containerd::shared()?;
    let ns = PodNetns::create(NETNS, HOST_IF)?;
    let listener = TcpListener::bind((HOST_IP, UP_PORT)).map_err(NetError::Listen)?;
    let mut moat = Vec::new();
    let mut runc = Vec::new();
    for i in 0..reps {
        for (runtime, out) in [(RUNTIME, &mut moat), (RUNC, &mut runc)] {
            let s = one(c, &ns, &listener, runtime, &format!("bench-net-{i}"), mib)?;
            eprintln!(
                "bench: net {i}: {runtime} pod → host {:.1} MB/s, host → pod {:.1} MB/s",
                s.up, s.down
            );
            out.push(s);
        }
    }
    let ups = |v: &[Sample]| v.iter().map(|s| s.up).collect::<Vec<_>>();
    let downs = |v: &[Sample]| v.iter().map(|s| s.down).collect::<Vec<_>>();
    report.section(&format!(
        "5. Bulk TCP throughput, {mib} MiB each way, pod in a CNI-like netns (veth), moat vs runc"
    ));
    for (what, m, r) in [
        (
            "pod → host (`dd` piped into busybox `nc`)",
            ups(&moat),
            ups(&runc),
        ),
        (
            "host → pod (into busybox `nc -l`)",
            downs(&moat),
            downs(&runc),
        ),
    ] {
        let (mm, rm) = (median(&m), median(&r));
        report.row(
            what,
            &show(mm, "MB/s"),
            &show(rm, "MB/s"),
            &ratio(mm, rm),
            "",
        );
        report.raw(format!(
            "net {what} raw (MB/s): moat {} runc {}",
            list1(&m),
            list1(&r)
        ));
    }
    Ok(())
}

/// Rates with one decimal, e.g. `[12.3, 9.8]`.
fn list1(samples: &[f64]) -> String {
    let parts: Vec<String> = samples.iter().map(|v| format!("{v:.1}")).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out `chunk` bytes per read, then EOF after `total`.
    struct Chunks {
        left: u64,
        chunk: usize,
    }

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = (self.left as usize).min(self.chunk).min(buf.len());
            self.left -= n as u64;
            Ok(n)
        }
    }

    #[test]
    fn receive_counts_after_the_first_read() {
        let (counted, _) = receive(
            Chunks {
                left: 1000,
                chunk: 100,
            },
            1000,
        )
        .unwrap();
        assert_eq!(counted, 900);
    }

    #[test]
    fn receive_reports_a_short_transfer() {
        let err = receive(
            Chunks {
                left: 300,
                chunk: 100,
            },
            1000,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                RecvError::Short {
                    got: 300,
                    want: 1000
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn receive_over_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&vec![7u8; 3 << 20]).unwrap();
        });
        let (s, _) = l.accept().unwrap();
        let (counted, elapsed) = receive(&s, 3 << 20).unwrap();
        sender.join().unwrap();
        // Only the first read (at most one 256 KiB buffer) is left out.
        assert!(
            ((3 << 20) - 256 * 1024..3 << 20).contains(&counted),
            "{counted}"
        );
        assert!(elapsed < Duration::from_secs(60));
    }

    #[test]
    fn rates_blocks_and_script() {
        assert_eq!(rate_mb_s(5_000_000, Duration::from_secs(2)), Some(2.5));
        assert_eq!(rate_mb_s(1, Duration::ZERO), None);
        assert_eq!(blocks(64), 1024);
        let s = script(blocks(1));
        assert!(s.contains("bs=65536 count=16 "), "{s}");
        assert!(s.contains(&format!("nc {HOST_IP} {UP_PORT}")), "{s}");
        assert!(s.contains(&format!("nc -l -p {DOWN_PORT}")), "{s}");
    }

    #[test]
    fn rate_lists() {
        assert_eq!(list1(&[12.34, 9.0]), "[12.3, 9.0]");
    }
}
