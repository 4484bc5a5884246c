//! Fuzz entry points (driven by `agent/fuzz/` under cargo-fuzz, and replayed
//! over the seed corpora by `tests/fuzz_corpus.rs` on stable Rust).
//!
//! * [`agent_request`]: the first byte picks an RPC, the rest is decoded as
//!   that RPC's protobuf request and dispatched to a sandbox-less,
//!   cgroup-less [`Agent`](crate::agent::Agent), so every check that
//!   runs before a live sandbox or container is needed (ids, OCI spec and
//!   process JSON, resources JSON, process references) sees hostile input.
//!   RPCs that would change the guest (CreateSandbox, DestroySandbox) or
//!   block (GetOomEvent) are decoded only; the process RPCs (WaitProcess,
//!   stdio, TtyResize) resolve their process reference.
//! * [`oci_spec`]: `config.json` bytes → the agent's parse + validation.
//!
//! Both return the agent's rejection message, so tests can check that
//! hostile seeds are refused and valid ones accepted.

use std::sync::OnceLock;

use moat_protocol::agent as pb;
use moat_protocol::protobuf::Message;

use crate::agent::Agent;
use crate::error::AgentError;
use crate::reaper::Reaper;

/// The RPCs [`agent_request`] selects by `data[0] % RPCS.len()`.
pub const RPCS: [&str; 22] = [
    "Version",
    "Health",
    "GetGuestDetails",
    "CreateSandbox",
    "DestroySandbox",
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "UpdateContainer",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "ListProcesses",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "WriteStdin",
    "CloseStdin",
    "ReadStdout",
    "ReadStderr",
    "TtyResize",
    "GetOomEvent",
];

struct Harness {
    rt: tokio::runtime::Runtime,
    agent: Agent,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| Harness {
        rt: tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("building a tokio runtime for the fuzz harness"),
        agent: Agent::without_cgroups(
            Reaper::default(),
            std::env::temp_dir().join("moat-agent-fuzz"),
        ),
    })
}

fn decode<M: Message>(b: &[u8]) -> Result<M, String> {
    M::parse_from_bytes(b).map_err(|e| format!("protobuf: {e}"))
}

fn pref(
    p: &moat_protocol::protobuf::MessageField<pb::ProcessRef>,
) -> Result<pb::ProcessRef, String> {
    p.as_ref()
        .cloned()
        .ok_or_else(|| "process reference missing".to_string())
}

/// Decodes and dispatches one request; `Err` carries the rejection.
pub fn agent_request(data: &[u8]) -> Result<(), String> {
    let Some((&sel, body)) = data.split_first() else {
        return Err("empty input".into());
    };
    let h = harness();
    let a = &h.agent;
    let e = |e: AgentError| e.to_string();
    match RPCS[usize::from(sel) % RPCS.len()] {
        "Version" => decode::<pb::VersionRequest>(body).map(drop),
        "Health" => decode::<pb::HealthRequest>(body).map(drop),
        "GetGuestDetails" => decode::<pb::GuestDetailsRequest>(body).map(drop),
        "CreateSandbox" => decode::<pb::CreateSandboxRequest>(body).map(drop),
        "DestroySandbox" => decode::<pb::DestroySandboxRequest>(body).map(drop),
        "CreateContainer" => {
            let r = decode::<pb::CreateContainerRequest>(body)?;
            h.rt.block_on(a.create_container(r)).map_err(e)
        }
        "StartContainer" => {
            let r = decode::<pb::ContainerRequest>(body)?;
            h.rt.block_on(a.start_container(&r.container_id)).map_err(e)
        }
        "RemoveContainer" => {
            let r = decode::<pb::RemoveContainerRequest>(body)?;
            h.rt.block_on(a.remove_container(&r.container_id, r.force))
                .map_err(e)
        }
        "UpdateContainer" => {
            let r = decode::<pb::UpdateContainerRequest>(body)?;
            a.update(&r.container_id, &r.resources).map_err(e)
        }
        "StatsContainer" => {
            let r = decode::<pb::ContainerRequest>(body)?;
            a.stats(&r.container_id).map(drop).map_err(e)
        }
        "PauseContainer" | "ResumeContainer" => {
            let pause = data[0] as usize % RPCS.len() == 10;
            let r = decode::<pb::ContainerRequest>(body)?;
            h.rt.block_on(a.pause(&r.container_id, pause)).map_err(e)
        }
        "ListProcesses" => {
            let r = decode::<pb::ContainerRequest>(body)?;
            a.list_processes(&r.container_id).map(drop).map_err(e)
        }
        "ExecProcess" => {
            let r = decode::<pb::ExecProcessRequest>(body)?;
            h.rt.block_on(a.exec_process(r)).map_err(e)
        }
        "SignalProcess" => {
            let r = decode::<pb::SignalProcessRequest>(body)?;
            a.signal(&pref(&r.process)?, r.signal, r.all).map_err(e)
        }
        "WaitProcess" => {
            let r = decode::<pb::WaitProcessRequest>(body)?;
            a.process(&pref(&r.process)?).map(drop).map_err(e)
        }
        "WriteStdin" => {
            let r = decode::<pb::WriteStdinRequest>(body)?;
            a.process(&pref(&r.process)?).map(drop).map_err(e)
        }
        "CloseStdin" => {
            let r = decode::<pb::CloseStdinRequest>(body)?;
            a.process(&pref(&r.process)?).map(drop).map_err(e)
        }
        "ReadStdout" | "ReadStderr" => {
            let r = decode::<pb::ReadStreamRequest>(body)?;
            a.process(&pref(&r.process)?).map(drop).map_err(e)
        }
        "TtyResize" => {
            let r = decode::<pb::TtyResizeRequest>(body)?;
            a.process(&pref(&r.process)?).map(drop).map_err(e)
        }
        _ => decode::<pb::GetOomEventRequest>(body).map(drop),
    }
}

/// Parses and validates an OCI `config.json`; `Err` carries the rejection.
pub fn oci_spec(data: &[u8]) -> Result<(), String> {
    let spec = crate::spec::parse_spec(data).map_err(|e| e.to_string())?;
    if let Some(p) = spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        crate::seccomp::compile(p).map_err(|e| e.to_string())?;
    }
    Ok(())
}
