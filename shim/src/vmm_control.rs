//! The shim's client of moat-vmm's control socket (`<state>/api.sock`, line-delimited JSON; the
//! protocol is in docs/vmm.md): what the shim asks the running VMM, as opposed to the agent
//! inside it. One connection per request, each bounded by [`CALL_TIMEOUT`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Bound of one request (connect, write, answer).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmmControlError {
    /// The socket could not be reached or the exchange broke off.
    #[error("moat-vmm control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No answer within [`CALL_TIMEOUT`].
    #[error("moat-vmm control socket {0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(PathBuf),
    /// The answer is not the protocol's JSON.
    #[error("moat-vmm control socket {path}: bad answer {line:?}: {source}")]
    Answer {
        /// The socket.
        path: PathBuf,
        /// What came back.
        line: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// moat-vmm refused the request (its message).
    #[error("moat-vmm refused {cmd}: {message}")]
    Refused {
        /// The command.
        cmd: String,
        /// moat-vmm's error text.
        message: String,
    },
}

/// moat-vmm's answer (the fields the shim uses).
#[derive(Debug, Default, Deserialize)]
pub struct Answer {
    /// Success.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// Hotplug memory plugged by the guest, MiB.
    #[serde(default)]
    pub plugged_mib: Option<u64>,
    /// Hotplug memory requested, MiB.
    #[serde(default)]
    pub requested_mib: Option<u64>,
}

/// Sends `request` (a JSON object with `cmd`) and returns the answer; a refusal is an error.
pub async fn call(socket: &Path, request: Value) -> Result<Answer, VmmControlError> {
    let cmd = request
        .get("cmd")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    let io = |source| VmmControlError::Io {
        path: socket.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await.map_err(io)?;
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).await.map_err(io)?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, VmmControlError>(answer)
    };
    let line = tokio::time::timeout(CALL_TIMEOUT, exchange)
        .await
        .map_err(|_| VmmControlError::Timeout(socket.to_owned()))??;
    let answer: Answer =
        serde_json::from_str(line.trim()).map_err(|source| VmmControlError::Answer {
            path: socket.to_owned(),
            line: line.clone(),
            source,
        })?;
    if answer.ok {
        Ok(answer)
    } else {
        Err(VmmControlError::Refused {
            cmd,
            message: answer.error.unwrap_or_default(),
        })
    }
}

/// Asks the guest to have `hotplug_mib` MiB of its virtio-mem region plugged.
pub async fn resize_memory(socket: &Path, hotplug_mib: u64) -> Result<Answer, VmmControlError> {
    call(
        socket,
        json!({"cmd": "resize-memory", "hotplug_mib": hotplug_mib}),
    )
    .await
}

/// The VMM's status (state, boot time, hotplug sizes).
pub async fn status(socket: &Path) -> Result<Answer, VmmControlError> {
    call(socket, json!({"cmd": "status"})).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A one-shot fake VMM answering `reply` to the first request, which it hands back.
    async fn fake(reply: &'static str) -> (PathBuf, tokio::task::JoinHandle<String>) {
        let path = std::env::temp_dir().join(format!(
            "moat-vmmctl-{}-{}.sock",
            std::process::id(),
            reply.len()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let task = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await.unwrap();
            w.write_all(reply.as_bytes()).await.unwrap();
            line
        });
        (path, task)
    }

    #[tokio::test]
    async fn resize_sends_the_command_and_reads_the_sizes() {
        let (path, task) = fake("{\"ok\":true,\"requested_mib\":256,\"plugged_mib\":0}\n").await;
        let a = resize_memory(&path, 256).await.unwrap();
        assert_eq!((a.requested_mib, a.plugged_mib), (Some(256), Some(0)));
        let sent: Value = serde_json::from_str(&task.await.unwrap()).unwrap();
        assert_eq!(sent, json!({"cmd": "resize-memory", "hotplug_mib": 256}));
        let _ = std::fs::remove_file(path);
    }

    #[tokio::test]
    async fn refusals_garbage_and_absence_are_errors() {
        let (path, _t) = fake("{\"ok\":false,\"error\":\"no hotplug memory\"}\n").await;
        let e = resize_memory(&path, 2).await.unwrap_err();
        assert!(e.to_string().contains("no hotplug memory"), "{e}");
        let _ = std::fs::remove_file(path);
        let (path, _t) = fake("garbage\n").await;
        assert!(matches!(
            status(&path).await,
            Err(VmmControlError::Answer { .. })
        ));
        let _ = std::fs::remove_file(&path);
        assert!(matches!(
            status(&path).await,
            Err(VmmControlError::Io { .. })
        ));
    }
}
