//! Process stdio between containerd and the guest: containerd hands the shim FIFO paths; the
//! agent exposes each process's streams as long-polling reads (`ReadStdout`, `ReadStderr`) and
//! writes (`WriteStdin`, `CloseStdin`). One task per stream copies between the two until end of
//! stream. Output relays are awaited before a process's exit is reported, so no output is lost.

use std::path::PathBuf;
use std::sync::Arc;

use moat_protocol::agent::{CloseStdinRequest, ProcessRef, ReadStreamRequest, WriteStdinRequest};
use moat_protocol::agent_ttrpc_async::AgentClient;
use moat_protocol::ttrpc::context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// Largest chunk moved per call.
const CHUNK: u32 = 64 * 1024;

/// The FIFOs containerd gave for one process (empty path: not attached).
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

/// Relays started for one process; `outputs` finish at end of stream.
pub struct Relays {
    pub outputs: Vec<JoinHandle<()>>,
}

impl Relays {
    /// Waits up to `limit` for every output relay to reach end of stream, then cuts the ones
    /// still running: their FIFOs close, so containerd's readers (which containerd 2.x waits
    /// for before it deletes a task) see end of file even when something in the guest still
    /// holds the process's output open. Returns whether the relays drained by themselves.
    pub async fn drain_or_cut(mut self, limit: std::time::Duration) -> bool {
        let drained = tokio::time::timeout(limit, async {
            for h in &mut self.outputs {
                let _ = h.await;
            }
        })
        .await
        .is_ok();
        for h in &self.outputs {
            h.abort();
        }
        drained
    }
}

/// Starts the relays of a started process.
/// `close_stdin` is notified on containerd's `CloseIO`: stdin is closed once what the FIFO already
/// holds has been forwarded.
pub fn start(
    agent: &AgentClient,
    process: &ProcessRef,
    stdio: &Stdio,
    close_stdin: Arc<Notify>,
) -> Relays {
    let mut outputs = Vec::new();
    if !stdio.stdout.is_empty() {
        outputs.push(tokio::spawn(relay_output(
            agent.clone(),
            process.clone(),
            Stream::Stdout,
            PathBuf::from(&stdio.stdout),
        )));
    }
    if !stdio.stderr.is_empty() && !stdio.terminal {
        outputs.push(tokio::spawn(relay_output(
            agent.clone(),
            process.clone(),
            Stream::Stderr,
            PathBuf::from(&stdio.stderr),
        )));
    }
    if !stdio.stdin.is_empty() {
        tokio::spawn(relay_stdin(
            agent.clone(),
            process.clone(),
            PathBuf::from(&stdio.stdin),
            close_stdin,
        ));
    }
    Relays { outputs }
}

async fn relay_output(agent: AgentClient, process: ProcessRef, stream: Stream, fifo: PathBuf) {
    let mut out = match tokio::fs::OpenOptions::new().write(true).open(&fifo).await {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(
                "{stream:?} of {}/{}: open {}: {e}; output is dropped",
                process.container_id,
                process.exec_id,
                fifo.display()
            );
            None
        }
    };
    let req = ReadStreamRequest {
        process: Some(process.clone()).into(),
        max_len: CHUNK,
        ..Default::default()
    };
    loop {
        let res = match stream {
            Stream::Stdout => agent.read_stdout(context::Context::default(), &req).await,
            Stream::Stderr => agent.read_stderr(context::Context::default(), &req).await,
        };
        match res {
            Ok(resp) if resp.data.is_empty() => break,
            Ok(resp) => {
                if let Some(f) = out.as_mut() {
                    if let Err(e) = f.write_all(&resp.data).await {
                        debug!(
                            "{stream:?} of {}: reader went away: {e}",
                            process.container_id
                        );
                        out = None;
                    }
                }
            }
            Err(e) => {
                debug!(
                    "{stream:?} of {}/{}: {e}",
                    process.container_id, process.exec_id
                );
                break;
            }
        }
    }
    if let Some(mut f) = out {
        let _ = f.flush().await;
    }
}

async fn relay_stdin(agent: AgentClient, process: ProcessRef, fifo: PathBuf, close: Arc<Notify>) {
    // Opening a FIFO for reading waits for its writer (containerd's client).
    let mut open = tokio::fs::OpenOptions::new();
    open.read(true);
    let file = tokio::select! {
        f = open.open(&fifo) => f,
        _ = close.notified() => {
            release_pending_open(&fifo);
            return close_stdin(&agent, &process).await;
        }
    };
    let mut file = match file {
        Ok(f) => f,
        Err(e) => {
            warn!(
                "stdin of {}: open {}: {e}",
                process.container_id,
                fifo.display()
            );
            return;
        }
    };
    let mut buf = vec![0u8; CHUNK as usize];
    loop {
        // Prefer data already in the FIFO over a pending CloseIO.
        let n = tokio::select! {
            biased;
            r = file.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = close.notified() => break,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let req = WriteStdinRequest {
                process: Some(process.clone()).into(),
                data: data.to_vec(),
                ..Default::default()
            };
            match agent.write_stdin(context::Context::default(), &req).await {
                Ok(resp) if resp.written > 0 => {
                    data = &data[(resp.written as usize).min(data.len())..]
                }
                Ok(_) => break,
                Err(e) => {
                    debug!("stdin of {}: {e}", process.container_id);
                    return;
                }
            }
        }
    }
    close_stdin(&agent, &process).await;
}

/// A reader blocked in open(2) on a FIFO waits for a writer; connecting one (non-blocking, and
/// closed at once) lets that open return, so no thread stays stuck on an abandoned FIFO.
fn release_pending_open(fifo: &std::path::Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo);
}

async fn close_stdin(agent: &AgentClient, process: &ProcessRef) {
    let req = CloseStdinRequest {
        process: Some(process.clone()).into(),
        ..Default::default()
    };
    if let Err(e) = agent.close_stdin(context::Context::default(), &req).await {
        debug!("close stdin of {}: {e}", process.container_id);
    }
}
