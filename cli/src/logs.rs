//! `moat logs POD`: the logs one pod's VM leaves in its state directory, which the shim's
//! `sandbox` module writes: `vmm.log` (moat-vmm's own output: devices, boot, exit reason) and
//! `console.log` (the guest's serial console: kernel messages and the agent's log). The agent
//! has no file of its own: it logs to the guest console, so its log is the `moat-agent[…]` lines
//! of `console.log`. This module owns collecting those ([`collect`]) and printing them
//! ([`render`]); finding the pod is [`crate::ps::find_pod`]'s.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ps::{find_pod, PsError};

/// The line prefix of the agent's log lines (the `moat-logging` format: component and pid).
const AGENT_PREFIX: &str = "moat-agent[";

/// One log of a pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Log {
    /// `vmm`, `console` or `agent`.
    pub name: &'static str,
    /// What it holds.
    pub what: &'static str,
    /// The file it is read from.
    pub path: PathBuf,
    /// The file exists.
    pub present: bool,
    /// Its text (lossy UTF-8); `None` when absent or unreadable.
    pub text: Option<String>,
    /// Why it is absent or empty, when it is.
    pub note: Option<String>,
}

/// The logs of one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodLogs {
    /// The containerd namespace.
    pub namespace: String,
    /// The full pod id.
    pub pod: String,
    /// Its state directory.
    pub dir: PathBuf,
    /// The VMM, console and agent logs, in that order.
    pub logs: Vec<Log>,
}

fn read(path: &Path) -> (bool, Option<String>, Option<String>) {
    match std::fs::read(path) {
        Ok(bytes) => (
            true,
            Some(String::from_utf8_lossy(&bytes).into_owned()),
            None,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (false, None, Some(format!("absent: no {}", path.display())))
        }
        Err(e) => (
            true,
            None,
            Some(format!("cannot read {}: {e}", path.display())),
        ),
    }
}

/// The agent's lines of a console log (the serial console may end lines with `\r`).
pub fn agent_lines(console: &str) -> String {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.trim_start().starts_with(AGENT_PREFIX))
        .fold(String::new(), |mut s, l| {
            s.push_str(l);
            s.push('\n');
            s
        })
}

/// Collects the logs of pod `pod` (full id or unique prefix) below `state_dir`.
pub fn collect(state_dir: &Path, pod: &str, namespace: Option<&str>) -> Result<PodLogs, PsError> {
    let (namespace, pod, dir) = find_pod(state_dir, pod, namespace)?;
    let vmm_path = dir.join("vmm.log");
    let console_path = dir.join("console.log");
    let (present, text, note) = read(&vmm_path);
    let vmm = Log {
        name: "vmm",
        what: "moat-vmm's output: devices, boot, exit reason",
        path: vmm_path,
        present,
        text,
        note,
    };
    let (present, text, note) = read(&console_path);
    let agent_text = text.as_deref().map(agent_lines);
    let agent_note = match (&agent_text, &note) {
        (_, Some(n)) => Some(format!("{n} (the agent logs to the guest console)")),
        (Some(t), None) if t.is_empty() => Some(
            "no moat-agent lines in console.log (the agent had not logged yet; log_level = \"debug\" in the moat config logs more)"
                .to_owned(),
        ),
        _ => None,
    };
    let console = Log {
        name: "console",
        what: "the guest console: kernel messages and the agent's log",
        path: console_path.clone(),
        present,
        text,
        note,
    };
    let agent = Log {
        name: "agent",
        what: "moat-agent's lines of the guest console",
        path: console_path,
        present,
        text: agent_text,
        note: agent_note,
    };
    Ok(PodLogs {
        namespace,
        pod,
        dir,
        logs: vec![vmm, console, agent],
    })
}

/// The text `moat logs` prints: each log under a `==> name log: path <==` heading, absent ones
/// said so.
pub fn render(logs: &PodLogs) -> String {
    let mut out = format!(
        "pod {} (namespace {}), {}\n",
        logs.pod,
        logs.namespace,
        logs.dir.display()
    );
    for log in &logs.logs {
        out.push_str(&format!(
            "\n==> {} log ({}): {} <==\n",
            log.name,
            log.what,
            log.path.display()
        ));
        if let Some(note) = &log.note {
            out.push_str(&format!("({note})\n"));
        }
        if let Some(text) = &log.text {
            out.push_str(text);
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    use moat_test_support::TempDir;

    fn state_dir(tag: &str) -> TempDir {
        TempDir::new(&format!("logs-{tag}"))
    }

    #[test]
    fn collects_vmm_console_and_agent_logs() {
        let d = state_dir("all");
        let pod = d.0.join("k8s.io/0123456789abcdef");
        fs::create_dir_all(&pod).unwrap();
        fs::write(pod.join("vmm.pid"), std::process::id().to_string()).unwrap();
        fs::write(pod.join("vmm.log"), "moat-vmm[9] INFO: booted in 120 ms\n").unwrap();
        fs::write(
            pod.join("console.log"),
            "[    0.000000] Linux version 6.1\r\nmoat-agent[1] INFO: serving protocol 3\r\n\
             [    0.5] random: crng init done\r\nmoat-agent[1] WARN container{id=web}: oom\r\n",
        )
        .unwrap();
        let logs = collect(&d.0, "0123", None).unwrap();
        assert_eq!(logs.namespace, "k8s.io");
        assert_eq!(logs.pod, "0123456789abcdef");
        let names: Vec<&str> = logs.logs.iter().map(|l| l.name).collect();
        assert_eq!(names, ["vmm", "console", "agent"]);
        assert!(logs.logs.iter().all(|l| l.present && l.note.is_none()));
        assert_eq!(
            logs.logs[2].text.as_deref(),
            Some("moat-agent[1] INFO: serving protocol 3\nmoat-agent[1] WARN container{id=web}: oom\n")
        );
        let text = render(&logs);
        assert!(text.contains("==> vmm log"), "{text}");
        assert!(text.contains("booted in 120 ms"), "{text}");
        assert!(text.contains("crng init done"), "{text}");
        let json = serde_json::to_value(&logs).unwrap();
        assert_eq!(json["logs"][0]["name"], "vmm");
        assert_eq!(json["logs"][1]["present"], true);
    }

    #[test]
    fn absent_logs_are_named() {
        let d = state_dir("absent");
        let pod = d.0.join("default/p1");
        fs::create_dir_all(&pod).unwrap();
        fs::write(pod.join("vmm.log"), "").unwrap();
        let logs = collect(&d.0, "p1", Some("default")).unwrap();
        assert!(logs.logs[0].present);
        assert_eq!(logs.logs[0].text.as_deref(), Some(""));
        for l in &logs.logs[1..] {
            assert!(!l.present, "{l:?}");
            assert!(
                l.note.as_deref().is_some_and(|n| n.contains("absent: no")),
                "{l:?}"
            );
        }
        let text = render(&logs);
        assert!(text.contains("(absent: no "), "{text}");
        assert!(collect(&d.0, "p1", Some("k8s.io")).is_err());
    }
}
