//! Tests of `moat install`'s flow with a stand-in containerd (a script whose `config dump`
//! prints the file it is given) and stand-in restart commands; the real containerds are in
//! cli/tests/containerd_config.rs.

use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("moat-install-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("proc")).unwrap();
        Dir(p)
    }

    /// A containerd stand-in: `--config FILE config dump` runs `body` with the file as `$2`.
    fn containerd(&self, body: &str) -> PathBuf {
        let p = self.0.join("containerd");
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn host(&self, containerd: PathBuf, restart: &[&str]) -> Host {
        Host {
            proc: self.0.join("proc"),
            containerd: Some(containerd),
            restart_command: restart.iter().map(|s| s.to_string()).collect(),
        }
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const V2: &str = "# my node\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";

fn opts(config: &Path, extra: &[&str]) -> Options {
    let mut args = vec![
        "--containerd-config".to_owned(),
        config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    parse_args(&args).unwrap()
}

fn run_to_string(o: &Options, host: &Host) -> (Result<(), InstallError>, String) {
    let mut out = Vec::new();
    let r = run(o, host, &mut out);
    (r, String::from_utf8(out).unwrap())
}

#[test]
fn arguments() {
    let s = |v: &[&str]| parse_args(&v.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    assert_eq!(s(&[]).unwrap(), Options::default());
    let o = s(&[
        "--containerd-config",
        "/c.toml",
        "--runtime-name=moat-b",
        "--dry-run",
        "--uninstall",
        "--restart",
    ])
    .unwrap();
    assert_eq!(
        o,
        Options {
            containerd_config: Some("/c.toml".into()),
            runtime_name: "moat-b".into(),
            dry_run: true,
            uninstall: true,
            restart: true,
        }
    );
    assert!(s(&["--bogus"]).unwrap_err().contains("unknown argument"));
    assert!(s(&["--containerd-config"])
        .unwrap_err()
        .contains("needs a path"));
    for bad in ["Moat", "-moat", "a b", "", "moat_1"] {
        let e = s(&["--runtime-name", bad]).unwrap_err();
        assert!(e.contains("DNS label"), "{bad}: {e}");
    }
}

#[test]
fn install_is_idempotent_backs_up_and_uninstall_restores() {
    let d = Dir::new("flow");
    let config = d.0.join("config.toml");
    fs::write(&config, V2).unwrap();
    let host = d.host(d.containerd("cat \"$2\""), &["true"]);

    let (r, out) = run_to_string(&opts(&config, &[]), &host);
    r.unwrap();
    assert!(
        out.contains("added runtime moat (runtime_type io.containerd.moat.v2)"),
        "{out}"
    );
    assert!(out.contains("checked: `"), "{out}");
    assert!(out.contains("restart containerd to load it: true"), "{out}");
    let installed = fs::read_to_string(&config).unwrap();
    assert!(installed.starts_with(V2), "{installed}");
    let backup = d.0.join("config.toml.moat-backup");
    assert_eq!(fs::read_to_string(&backup).unwrap(), V2);

    // Again: nothing changes, no backup is written.
    fs::remove_file(&backup).unwrap();
    let (r, out) = run_to_string(&opts(&config, &["--restart"]), &host);
    r.unwrap();
    assert!(
        out.contains("(added by moat install): nothing to change"),
        "{out}"
    );
    assert!(!out.contains("restarted"), "no change, no restart: {out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), installed);
    assert!(!backup.exists());

    // Uninstall, with a restart.
    let (r, out) = run_to_string(&opts(&config, &["--uninstall", "--restart"]), &host);
    r.unwrap();
    assert!(
        out.contains("removed runtime moat (added by moat install)"),
        "{out}"
    );
    assert!(out.contains("restarted containerd (true)"), "{out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), V2);
    assert_eq!(fs::read_to_string(&backup).unwrap(), installed);
    let (r, out) = run_to_string(&opts(&config, &["--uninstall"]), &host);
    r.unwrap();
    assert!(out.contains("no runtime moat in"), "{out}");
}

#[test]
fn dry_run_prints_the_diff_and_writes_nothing() {
    let d = Dir::new("dry");
    let config = d.0.join("config.toml");
    fs::write(&config, V2).unwrap();
    let host = d.host(d.containerd("cat \"$2\""), &["false"]);
    let (r, out) = run_to_string(&opts(&config, &["--dry-run", "--restart"]), &host);
    r.unwrap();
    assert!(
        out.contains(&format!("--- {} (now)", config.display())),
        "{out}"
    );
    assert!(
        out.contains("+[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing written"), "{out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), V2);
    assert!(!d.0.join("config.toml.moat-backup").exists());
}

#[test]
fn restart_failures_are_reported() {
    let d = Dir::new("restart");
    let config = d.0.join("config.toml");
    fs::write(&config, V2).unwrap();
    let containerd = d.containerd("cat \"$2\"");
    let host = d.host(
        containerd.clone(),
        &["sh", "-c", "echo unit not found >&2; exit 5"],
    );
    let (r, out) = run_to_string(&opts(&config, &["--restart"]), &host);
    let e = r.unwrap_err();
    assert!(matches!(e, InstallError::RestartFailed { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("unit not found") && msg.contains("journalctl"),
        "{msg}"
    );
    assert!(out.contains("added runtime moat"), "{out}");

    let host = d.host(containerd, &["/nonexistent/systemctl", "restart"]);
    let (r, _) = run_to_string(&opts(&config, &["--uninstall", "--restart"]), &host);
    let e = r.unwrap_err();
    assert!(matches!(e, InstallError::RestartSpawn { .. }), "{e}");
    assert!(e.to_string().contains("restart containerd yourself"), "{e}");
}

#[test]
fn a_config_containerd_rejects_is_not_written() {
    let d = Dir::new("reject");
    let config = d.0.join("config.toml");
    fs::write(&config, V2).unwrap();
    let host = d.host(
        d.containerd(
            "if grep -q moat \"$2\"; then echo 'invalid plugin key' >&2; exit 1; fi; cat \"$2\"",
        ),
        &["true"],
    );
    let (r, _) = run_to_string(&opts(&config, &[]), &host);
    let e = r.unwrap_err();
    assert!(matches!(e, InstallError::Rejected { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("left as it was") && msg.contains("invalid plugin key"),
        "{msg}"
    );
    assert_eq!(fs::read_to_string(&config).unwrap(), V2);

    // One whose dump lacks the runtime.
    let host = d.host(d.containerd("echo 'version = 2'"), &["true"]);
    let (r, _) = run_to_string(&opts(&config, &[]), &host);
    let e = r.unwrap_err();
    assert!(matches!(e, InstallError::NotInDump { .. }), "{e}");
    assert_eq!(fs::read_to_string(&config).unwrap(), V2);
}

#[test]
fn a_handwritten_runtime_is_left_alone_and_said_so() {
    let d = Dir::new("hand");
    let config = d.0.join("config.toml");
    let text = format!("{V2}\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]\n  runtime_type = \"io.containerd.kata.v2\"\n");
    fs::write(&config, &text).unwrap();
    let host = d.host(d.containerd("cat \"$2\""), &["true"]);
    let (r, out) = run_to_string(&opts(&config, &[]), &host);
    r.unwrap();
    assert!(
        out.contains("not added by moat install: left as it is"),
        "{out}"
    );
    assert!(
        out.contains("its runtime_type is io.containerd.kata.v2"),
        "{out}"
    );
    let (r, out) = run_to_string(&opts(&config, &["--uninstall"]), &host);
    r.unwrap();
    assert!(out.contains("was not added by moat install"), "{out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), text);
}
