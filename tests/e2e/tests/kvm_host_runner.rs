//! Tests of the test host itself (`tests/kvm-host/run`), run from the outside like CI runs it:
//! the inner command's status, output, environment and working directory come back; a failing or
//! hung inner command fails the run; the host has a real KVM; a second run reuses the cache.

use std::path::PathBuf;
use std::process::{Command, Output};

fn runner() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../kvm-host/run")
}

/// Runs `tests/kvm-host/run -- sh -c SCRIPT` with a small software host, from outside any host.
fn run_in_host(script: &str, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(runner());
    cmd.args(["--", "sh", "-c", script])
        .env_remove("MOAT_KVM_HOST")
        .env("MOAT_KVM_HOST_MEM", "768");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("tests/kvm-host/run could not be started");
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn inner_status_output_env_and_cwd_come_back_and_cache_is_reused() {
    let cwd = std::env::current_dir().unwrap();
    let out = run_in_host(
        r#"echo "probe env=$MOAT_E2E_PROBE cwd=$(pwd) host=$MOAT_KVM_HOST"; exit 7"#,
        &[("MOAT_E2E_PROBE", "a value with spaces")],
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "inner exit 7 must be the run's status"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = format!("probe env=a value with spaces cwd={}", cwd.display());
    assert!(
        stdout.contains(&expected),
        "expected {expected:?} in the output"
    );

    // The acceptance probe: a real KVM with SVM (or VMX on a hardware Intel host).
    let out = run_in_host(
        "test -c /dev/kvm && test ! -d /sys/module/kvm_pvm && grep -qwE 'svm|vmx' /proc/cpuinfo",
        &[],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "the host must offer a real /dev/kvm"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.contains("hardware KVM found") {
        assert!(
            stderr.contains("(warm cache)") && !stderr.contains("downloading"),
            "a second run must reuse the cached host image"
        );
    }
}

#[test]
fn failing_inner_command_fails_the_run() {
    let out = run_in_host("false", &[]);
    assert!(!out.status.success(), "`false` inside must fail the run");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn hung_inner_command_times_out_with_a_message() {
    let out = run_in_host("sleep 3600", &[("MOAT_KVM_HOST_TIMEOUT", "90")]);
    assert_eq!(
        out.status.code(),
        Some(124),
        "a hung run must end with status 124"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out after 90 s"),
        "the time-out must be explained"
    );
}
