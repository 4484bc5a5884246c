//! Compiles an OCI `linux.seccomp` profile into classic-BPF programs with
//! the rust-vmm `seccompiler` crate (pure Rust, no libseccomp).
//!
//! seccompiler filters have a single match action, while OCI rules each
//! carry their own. The profile is therefore split into one filter per
//! distinct rule action `A` (matching rules → `A`, everything else → allow)
//! plus a final filter (every listed rule → allow, everything else → the
//! default action). The kernel runs all installed filters and applies the
//! most restrictive result, which gives each listed syscall its own action
//! and every other syscall the default. Syscall names unknown to this
//! architecture are skipped with a warning, as runc does.

use std::collections::{BTreeMap, BTreeSet};

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use serde_json::{json, Value};

/// Errors compiling a profile.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// An action that cannot be expressed.
    #[error("seccomp: action {0:?} is not supported")]
    Action(LinuxSeccompAction),
    /// seccompiler refused the filter.
    #[error("seccomp: compiling the profile: {0}")]
    Compile(#[source] seccompiler::Error),
    /// seccompiler does not target the agent's architecture.
    #[error("seccomp: compiling the profile: unsupported architecture {0}")]
    Arch(&'static str),
    /// seccompiler's output lacks one of the filters it was given (an internal
    /// inconsistency).
    #[error("seccomp: compiling the profile: filter {0} missing")]
    MissingFilter(String),
    /// An action's JSON form did not parse back (an internal inconsistency).
    #[error("seccomp: compiling the profile: {0}")]
    Json(#[source] serde_json::Error),
}

/// A raw program: (code, jt, jf, k) per instruction.
pub type RawProgram = Vec<(u16, u8, u8, u32)>;

fn action_json(a: LinuxSeccompAction, errno: Option<u32>) -> Result<Value, SeccompError> {
    use LinuxSeccompAction as A;
    Ok(match a {
        A::ScmpActAllow => json!("allow"),
        A::ScmpActErrno => json!({ "errno": errno.unwrap_or(libc::EPERM as u32) }),
        A::ScmpActKill | A::ScmpActKillThread => json!("kill_thread"),
        A::ScmpActKillProcess => json!("kill_process"),
        A::ScmpActTrap => json!("trap"),
        A::ScmpActLog => json!("log"),
        A::ScmpActTrace => json!({ "trace": errno.unwrap_or(0) }),
        other => return Err(SeccompError::Action(other)),
    })
}

fn known_syscall(name: &str) -> bool {
    let probe = json!({ "p": { "mismatch_action": "allow", "match_action": "trap", "filter": [ { "syscall": name } ] } });
    seccompiler::compile_from_json(
        probe.to_string().as_bytes(),
        std::env::consts::ARCH
            .try_into()
            .unwrap_or(seccompiler::TargetArch::x86_64),
    )
    .is_ok()
}

/// Compiles `profile` into the programs to install, in order.
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<RawProgram>, SeccompError> {
    if profile.flags().as_ref().is_some_and(|f| !f.is_empty()) {
        tracing::warn!("seccomp flags {:?} ignored", profile.flags());
    }
    let default = action_json(profile.default_action(), profile.default_errno_ret())?;
    // action (as JSON text) -> syscall -> conditions (None = unconditional)
    let mut groups: BTreeMap<String, BTreeMap<String, Option<Vec<Value>>>> = BTreeMap::new();
    let mut unknown = BTreeSet::new();
    let mut known = BTreeSet::new();
    for rule in profile.syscalls().iter().flatten() {
        let action = action_json(rule.action(), rule.errno_ret())?;
        if action == default {
            continue;
        }
        let mut conds = Vec::new();
        for arg in rule.args().iter().flatten() {
            let (op, val) = match arg.op() {
                LinuxSeccompOperator::ScmpCmpNe => (json!("ne"), arg.value()),
                LinuxSeccompOperator::ScmpCmpLt => (json!("lt"), arg.value()),
                LinuxSeccompOperator::ScmpCmpLe => (json!("le"), arg.value()),
                LinuxSeccompOperator::ScmpCmpEq => (json!("eq"), arg.value()),
                LinuxSeccompOperator::ScmpCmpGe => (json!("ge"), arg.value()),
                LinuxSeccompOperator::ScmpCmpGt => (json!("gt"), arg.value()),
                LinuxSeccompOperator::ScmpCmpMaskedEq => (
                    json!({ "masked_eq": arg.value() }),
                    arg.value_two().unwrap_or(0),
                ),
            };
            conds.push(json!({ "index": arg.index(), "type": "qword", "op": op, "val": val }));
        }
        let group = groups.entry(action.to_string()).or_default();
        for name in rule.names() {
            if unknown.contains(name) {
                continue;
            }
            if !known.contains(name) {
                if known_syscall(name) {
                    known.insert(name.clone());
                } else {
                    tracing::warn!(
                        "seccomp: syscall {name:?} unknown on this architecture, skipped"
                    );
                    unknown.insert(name.clone());
                    continue;
                }
            }
            // An unconditional rule for a syscall wins over conditional ones.
            let slot = group
                .entry(name.clone())
                .or_insert_with(|| Some(Vec::new()));
            match (slot.as_mut(), conds.is_empty()) {
                (_, true) => *slot = None,
                (Some(list), false) => list.push(Value::Array(conds.clone())),
                (None, false) => {}
            }
        }
    }
    let rules_json = |g: &BTreeMap<String, Option<Vec<Value>>>| -> Vec<Value> {
        let mut out = Vec::new();
        for (name, conds) in g {
            match conds {
                None => out.push(json!({ "syscall": name })),
                Some(list) => {
                    for c in list {
                        out.push(json!({ "syscall": name, "args": c }));
                    }
                }
            }
        }
        out
    };
    let mut filters = serde_json::Map::new();
    let mut order = Vec::new();
    let mut all: BTreeMap<String, Option<Vec<Value>>> = BTreeMap::new();
    for (i, (action, g)) in groups.iter().enumerate() {
        for (name, conds) in g {
            let e = all.entry(name.clone()).or_insert_with(|| Some(Vec::new()));
            match (e.as_mut(), conds) {
                (_, None) => *e = None,
                (Some(list), Some(c)) => list.extend(c.iter().cloned()),
                (None, Some(_)) => {}
            }
        }
        if action == "\"allow\"" || g.is_empty() {
            continue;
        }
        let key = format!("g{i:03}");
        let action: Value = serde_json::from_str(action).map_err(SeccompError::Json)?;
        filters.insert(
            key.clone(),
            json!({ "mismatch_action": "allow", "match_action": action, "filter": rules_json(g) }),
        );
        order.push(key);
    }
    // With an allowing default the per-action filters say everything.
    if default != json!("allow") {
        filters.insert("zfinal".into(), json!({ "mismatch_action": default, "match_action": "allow", "filter": rules_json(&all) }));
        order.push("zfinal".into());
    }

    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let mut map =
        seccompiler::compile_from_json(Value::Object(filters).to_string().as_bytes(), arch)
            .map_err(SeccompError::Compile)?;
    let mut out = Vec::new();
    for k in order {
        let prog = map
            .remove(&k)
            .ok_or_else(|| SeccompError::MissingFilter(k.clone()))?;
        out.push(prog.iter().map(|f| (f.code, f.jt, f.jf, f.k)).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_mixed_actions_and_skips_unknown() {
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir","mkdirat","no_such_syscall"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                {"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["reboot"],"action":"SCMP_ACT_KILL_PROCESS"}]}"#,
        )
        .unwrap();
        let progs = compile(&profile).unwrap();
        // one filter per non-default action; no final one for an allowing default
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn rejects_notify() {
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        )
        .unwrap();
        assert!(matches!(compile(&profile), Err(SeccompError::Action(_))));
    }
}
