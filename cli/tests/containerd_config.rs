//! `moat install` against real containerd configuration files and real containerds: the
//! `config default` of containerd 1.6 (`version = 2`) and 2.x (`version = 4`), Debian's packaged
//! file, and hand-written files with other runtimes, comments and imports (cli/tests/fixtures).
//! Each test installs into a copy, then has the containerd of the matching version read the
//! result (`containerd --config FILE config dump`) and checks that it runs the moat runtime with
//! runtime_type io.containerd.moat.v2, that a second run changes nothing, and that `--uninstall`
//! gives back the original bytes (and containerd no longer shows the runtime).
//!
//! The containerds: 1.6 from Debian (`/usr/bin/containerd`), 2.x from scripts/deps
//! (`$MOAT_TEST_TOOLS/containerd2/containerd`, default /usr/local/lib/moat-test). A test whose
//! containerd is missing reports itself skipped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use moat_cli::containerd_config::{self as cc, RUNTIME_TYPE};
use moat_cli::install::{self, Host, InstallError, Options};
use moat_test_support::skip;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The containerd binary of major version `major`, if installed.
fn containerd(major: u32) -> Option<PathBuf> {
    let tools = std::env::var_os("MOAT_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/lib/moat-test"));
    let candidates = match major {
        1 => vec![
            PathBuf::from("/usr/bin/containerd"),
            PathBuf::from("/usr/local/bin/containerd"),
        ],
        _ => vec![tools.join("containerd2/containerd")],
    };
    candidates.into_iter().find(|bin| {
        Command::new(bin)
            .arg("--version")
            .output()
            .ok()
            .is_some_and(|o| {
                let v = String::from_utf8_lossy(&o.stdout);
                let version = v.split_whitespace().nth(2).unwrap_or_default();
                version
                    .trim_start_matches('v')
                    .starts_with(&format!("{major}."))
            })
    })
}

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("moat-cc-it-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(p.join("proc")).unwrap();
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn host(dir: &Dir, containerd: &Path) -> Host {
    Host {
        // An empty /proc: no running containerd, so nothing depends on this machine's.
        proc: dir.0.join("proc"),
        containerd: Some(containerd.to_owned()),
        restart_command: vec!["true".into()],
    }
}

fn run(config: &Path, host: &Host, extra: &[&str]) -> Result<String, InstallError> {
    let mut args = vec![
        "--containerd-config".to_owned(),
        config.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let opts: Options = install::parse_args(&args).expect("valid arguments");
    let mut out = Vec::new();
    install::run(&opts, host, &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The moat runtime's type in what `containerd` runs with from `config`.
fn dumped(containerd: &Path, config: &Path) -> Option<String> {
    let dump = cc::dump_file(containerd, config).unwrap_or_else(|e| {
        panic!(
            "{} must read {}: {e}",
            containerd.display(),
            config.display()
        )
    });
    cc::dumped_runtime_type(&dump, "moat")
}

/// The whole cycle on a copy of fixture `name`, read by `containerd`.
fn cycle(name: &str, containerd: &Path) {
    let d = Dir::new(&name.replace(['/', '.'], "-"));
    let original = fs::read_to_string(fixtures().join(name)).unwrap();
    let config = d.0.join("config.toml");
    fs::write(&config, &original).unwrap();
    let host = host(&d, containerd);
    assert_eq!(dumped(containerd, &config), None, "{name}: no moat before");

    // Dry run: a diff, nothing written.
    let out = run(&config, &host, &["--dry-run"]).unwrap();
    assert!(out.contains("dry run: nothing written"), "{name}: {out}");
    assert!(
        out.contains("+") && out.contains("runtimes.moat]"),
        "{name}: {out}"
    );
    assert_eq!(fs::read_to_string(&config).unwrap(), original);

    let out = run(&config, &host, &[]).unwrap();
    assert!(out.contains("added runtime moat"), "{name}: {out}");
    assert!(out.contains("checked: `"), "{name}: {out}");
    assert!(
        out.contains("systemctl restart containerd") || out.contains("restart containerd"),
        "{out}"
    );
    let installed = fs::read_to_string(&config).unwrap();
    assert_eq!(
        fs::read_to_string(d.0.join("config.toml.moat-backup")).unwrap(),
        original,
        "{name}: backup"
    );
    // Everything outside moat's table is byte-for-byte the same: removing the added lines
    // gives the original back.
    let diff = similar::TextDiff::from_lines(&original, &installed);
    for change in diff.iter_all_changes() {
        assert_ne!(
            change.tag(),
            similar::ChangeTag::Delete,
            "{name}: changed line {:?}",
            change.value()
        );
    }
    assert_eq!(
        dumped(containerd, &config).as_deref(),
        Some(RUNTIME_TYPE),
        "{name}: containerd must run the moat runtime\n{installed}"
    );

    // Idempotent.
    let out = run(&config, &host, &[]).unwrap();
    assert!(out.contains("nothing to change"), "{name}: {out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), installed);

    // Uninstall: the original bytes, and containerd no longer has the runtime.
    let out = run(&config, &host, &["--uninstall"]).unwrap();
    assert!(out.contains("removed runtime moat"), "{name}: {out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), original, "{name}");
    assert_eq!(dumped(containerd, &config), None, "{name}: no moat after");
}

macro_rules! with_containerd {
    ($major:expr) => {
        match containerd($major) {
            Some(c) => c,
            None => {
                skip(format!(
                    "containerd {}.x is not installed (scripts/deps installs it)",
                    $major
                ));
                return;
            }
        }
    };
}

#[test]
fn containerd_1_6_default_config() {
    let c = with_containerd!(1);
    cycle("containerd-1.6-default.toml", &c);
}

#[test]
fn debian_packaged_config() {
    let c = with_containerd!(1);
    cycle("debian-bookworm.toml", &c);
}

#[test]
fn version_2_with_other_runtimes_comments_and_imports() {
    let c = with_containerd!(1);
    cycle("v2-runtimes.toml", &c);
    let original = fs::read_to_string(fixtures().join("v2-runtimes.toml")).unwrap();
    let d = Dir::new("v2-others");
    let config = d.0.join("config.toml");
    fs::write(&config, &original).unwrap();
    run(&config, &host(&d, &c), &[]).unwrap();
    // runc and kata are still what they were, for containerd too.
    let dump = cc::dump_file(&c, &config).unwrap();
    let runtimes = cc::dumped_runtimes(&dump);
    for (name, t) in [
        ("runc", "io.containerd.runc.v2"),
        ("kata", "io.containerd.kata.v2"),
        ("moat", RUNTIME_TYPE),
    ] {
        assert!(
            runtimes.iter().any(|(n, rt)| n == name && rt == t),
            "{name}: {runtimes:?}"
        );
    }
}

#[test]
fn containerd_2_default_config() {
    let c = with_containerd!(2);
    cycle("containerd-2.4-default.toml", &c);
}

#[test]
fn version_3_with_other_runtimes_and_comments() {
    let c = with_containerd!(2);
    cycle("v3-runtimes.toml", &c);
}

#[test]
fn containerd_2_reads_a_version_2_install() {
    // A node upgraded from 1.x to 2.x keeps its version 2 file; containerd 2 migrates it.
    let c = with_containerd!(2);
    cycle("v2-runtimes.toml", &c);
}

#[test]
fn a_missing_config_is_written_in_the_installed_containerds_format() {
    for major in [1, 2] {
        let Some(c) = containerd(major) else {
            skip(format!(
                "containerd {major}.x is not installed (scripts/deps installs it)"
            ));
            continue;
        };
        let d = Dir::new(&format!("missing-{major}"));
        let config = d.0.join("etc/containerd/config.toml");
        let out = run(&config, &host(&d, &c), &[]).unwrap();
        assert!(out.contains("(a new file)"), "{out}");
        let text = fs::read_to_string(&config).unwrap();
        // containerd 1.x: version 2; 2.x: the version its own `config default` has (4 for 2.4).
        let want = if major == 1 {
            "version = 2".to_owned()
        } else {
            let out = Command::new(&c)
                .args(["config", "default"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.starts_with("version = "))
                .unwrap_or("version = 3")
                .to_owned()
        };
        assert!(text.lines().any(|l| l == want), "{want}: {text}");
        assert_eq!(dumped(&c, &config).as_deref(), Some(RUNTIME_TYPE), "{text}");
        let out = run(&config, &host(&d, &c), &["--uninstall"]).unwrap();
        assert!(out.contains("moat install had created it"), "{out}");
        assert!(!config.exists());
    }
}

#[test]
fn a_runtime_from_an_import_is_left_where_it_is() {
    let c = with_containerd!(1);
    let d = Dir::new("imports");
    fs::create_dir_all(d.0.join("conf.d")).unwrap();
    for f in ["config.toml", "conf.d/moat.toml"] {
        fs::copy(fixtures().join("imports").join(f), d.0.join(f)).unwrap();
    }
    let config = d.0.join("config.toml");
    let before = fs::read_to_string(&config).unwrap();
    assert_eq!(dumped(&c, &config).as_deref(), Some(RUNTIME_TYPE));
    let out = run(&config, &host(&d, &c), &[]).unwrap();
    assert!(
        out.contains(&format!(
            "already in {}, imported by {}",
            d.0.join("conf.d/moat.toml").display(),
            config.display()
        )),
        "{out}"
    );
    let out = run(&config, &host(&d, &c), &["--uninstall"]).unwrap();
    assert!(out.contains("which moat install does not edit"), "{out}");
    assert_eq!(fs::read_to_string(&config).unwrap(), before);
    assert!(!d.0.join("config.toml.moat-backup").exists());
}
