//! Unit tests of [`super`]: discovery on fabricated `/proc` trees, planning on the fixture
//! files and on small texts, writing in a temporary directory. The real containerds read the
//! results in cli/tests/containerd_config.rs.

use super::*;
use std::os::unix::fs::symlink;

fn fixture(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn never() -> Result<i64> {
    panic!("the file has a version: containerd must not be asked")
}

use moat_test_support::TempDir as Dir;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

const CONFIG: &str = "/etc/containerd/config.toml";

fn install(old: &str) -> String {
    match plan_install(Path::new(CONFIG), Some(old), &Entry::default(), &mut never) {
        Ok(InstallPlan::Change { new, .. }) => new,
        other => panic!("expected a change: {other:?}"),
    }
}

fn uninstall(text: &str) -> Option<String> {
    match plan_uninstall(Path::new(CONFIG), Some(text), "moat") {
        Ok(UninstallPlan::Change { new, .. }) => new,
        other => panic!("expected a change: {other:?}"),
    }
}

/// The lines `new` has beyond `old`; panics when anything of `old` changed or went.
fn only_added(old: &str, new: &str) -> String {
    let diff = similar::TextDiff::from_lines(old, new);
    let mut added = String::new();
    for change in diff.iter_all_changes() {
        match change.tag() {
            similar::ChangeTag::Equal => {}
            similar::ChangeTag::Insert => added.push_str(change.value()),
            similar::ChangeTag::Delete => panic!("line removed: {:?}", change.value()),
        }
    }
    added
}

#[test]
fn daemon_command_lines_give_their_config() {
    assert_eq!(daemon_config_flag(&args("")), Some(None));
    assert_eq!(
        daemon_config_flag(&args("--config /etc/c.toml")),
        Some(Some("/etc/c.toml".into()))
    );
    assert_eq!(
        daemon_config_flag(&args("-c c.toml --log-level debug")),
        Some(Some("c.toml".into()))
    );
    assert_eq!(
        daemon_config_flag(&args("--log-level debug --config=/x.toml")),
        Some(Some("/x.toml".into()))
    );
    assert_eq!(
        daemon_config_flag(&args("-l debug -c=/y.toml --root /r")),
        Some(Some("/y.toml".into()))
    );
    // A value that looks like a subcommand belongs to its flag.
    assert_eq!(daemon_config_flag(&args("--root config")), Some(None));
    // Not the daemon: subcommands and --version.
    assert_eq!(daemon_config_flag(&args("config dump")), None);
    assert_eq!(
        daemon_config_flag(&args("--config /c.toml config dump")),
        None
    );
    assert_eq!(daemon_config_flag(&args("--version")), None);
}

fn fake_process(proc: &Path, pid: u32, ppid: u32, argv: &[&str], cwd: Option<&Path>) {
    let dir = proc.join(pid.to_string());
    fs::create_dir_all(&dir).unwrap();
    let mut cmdline = argv.join("\0");
    cmdline.push('\0');
    fs::write(dir.join("cmdline"), cmdline).unwrap();
    fs::write(
        dir.join("stat"),
        format!("{pid} (x) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"),
    )
    .unwrap();
    if let Some(cwd) = cwd {
        symlink(cwd, dir.join("cwd")).unwrap();
    }
}

#[test]
fn the_running_containerd_names_the_config() {
    let d = Dir::new("proc");
    let proc = d.0.join("proc");
    fs::create_dir_all(&proc).unwrap();
    // Nothing running: containerd's default path.
    let loc = locate(&proc, None);
    assert_eq!(loc.path, Path::new(DEFAULT_PATH));
    assert_eq!(loc.containerd, None);
    assert!(loc.reason().contains("no running containerd"), "{loc:?}");

    // A private containerd (not a service) with a relative config, and a short-lived
    // `containerd config dump`, and a shim.
    fake_process(
        &proc,
        10,
        5,
        &["containerd", "--config", "private.toml"],
        Some(Path::new("/srv/ctd")),
    );
    fake_process(
        &proc,
        11,
        1,
        &["/usr/bin/containerd", "config", "dump"],
        None,
    );
    fake_process(
        &proc,
        12,
        1,
        &[
            "/usr/local/bin/containerd-shim-moat-v2",
            "-namespace",
            "k8s.io",
        ],
        None,
    );
    let loc = locate(&proc, None);
    assert_eq!(loc.path, Path::new("/srv/ctd/private.toml"));
    assert_eq!(loc.containerd.as_ref().map(|c| c.pid), Some(10));
    assert!(loc.reason().contains("--config"), "{}", loc.reason());

    // The system service wins.
    fake_process(
        &proc,
        20,
        1,
        &["/usr/bin/containerd", "-c=/etc/containerd/node.toml"],
        None,
    );
    let loc = locate(&proc, None);
    assert_eq!(loc.path, Path::new("/etc/containerd/node.toml"));
    assert_eq!(loc.containerd.as_ref().map(|c| c.pid), Some(20));

    // An explicit path overrides everything.
    let loc = locate(&proc, Some(Path::new("/tmp/c.toml")));
    assert_eq!(loc.path, Path::new("/tmp/c.toml"));
    assert!(loc.explicit);
    assert_eq!(loc.reason(), "given with --containerd-config");

    // A service without --config reads the default.
    fs::remove_dir_all(proc.join("20")).unwrap();
    fs::remove_dir_all(proc.join("10")).unwrap();
    fake_process(&proc, 30, 1, &["containerd"], None);
    let loc = locate(&proc, None);
    assert_eq!(loc.path, Path::new(DEFAULT_PATH));
    assert!(loc.reason().contains("pid 30"), "{}", loc.reason());
}

#[test]
fn a_containerd_started_before_the_change_must_restart() {
    let d = Dir::new("stale");
    let proc = d.0.join("proc");
    fake_process(&proc, 40, 1, &["containerd"], None);
    // Started 1 s after boot at t = 1000 s.
    fs::write(proc.join("stat"), "btime 999\n").unwrap();
    let file = d.0.join("config.toml");
    fs::write(&file, "version = 2\n").unwrap();
    let set = |secs| {
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap()
    };
    set(5000);
    assert_eq!(started_before_change(&proc, 40, &file), Some(true));
    set(500);
    assert_eq!(started_before_change(&proc, 40, &file), Some(false));
    assert_eq!(started_before_change(&proc, 41, &file), None);
}

#[test]
fn install_adds_only_the_marked_table_and_uninstall_restores_every_byte() {
    for name in [
        "containerd-1.6-default.toml",
        "containerd-2.4-default.toml",
        "debian-bookworm.toml",
        "v2-runtimes.toml",
        "v3-runtimes.toml",
    ] {
        let old = fixture(name);
        let new = install(&old);
        let added = only_added(&old, &new);
        let v3 = !old.contains("version = 2");
        let (plugin, q) = if v3 {
            ("'io.containerd.cri.v1.runtime'", '\'')
        } else {
            ("\"io.containerd.grpc.v1.cri\"", '"')
        };
        let expect = [
            format!("# {MARKER} (`moat install --uninstall` removes it)"),
            format!("[plugins.{plugin}.containerd.runtimes.moat]"),
            format!("runtime_type = {q}{RUNTIME_TYPE}{q}"),
            format!("[plugins.{plugin}.containerd.runtimes.moat.options]"),
            format!("ConfigPath = {q}/etc/moat/config.toml{q}"),
        ];
        let lines: Vec<&str> = added
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines, expect, "{name}: added\n{added}");
        // Idempotent: the second run finds its own entry.
        match plan_install(Path::new(CONFIG), Some(&new), &Entry::default(), &mut never) {
            Ok(InstallPlan::Present(f)) => {
                assert!(f.added_by_moat, "{name}: {f:?}");
                assert_eq!(f.runtime_type.as_deref(), Some(RUNTIME_TYPE));
                assert_eq!(f.file, Path::new(CONFIG));
            }
            other => panic!("{name}: second run: {other:?}"),
        }
        assert_eq!(uninstall(&new).as_deref(), Some(old.as_str()), "{name}");
        assert_eq!(
            plan_uninstall(Path::new(CONFIG), Some(&old), "moat").unwrap(),
            UninstallPlan::Absent
        );
    }
}

#[test]
fn the_entry_is_indented_like_its_neighbours() {
    let new = install(&fixture("containerd-1.6-default.toml"));
    assert!(
        new.contains(
            "\n        [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]\n          runtime_type"
        ),
        "{new}"
    );
    // Not indented at all where nothing is.
    let new = install("version = 2\n");
    assert_eq!(
        new,
        format!(
            "version = 2\n\n# {MARKER} (`moat install --uninstall` removes it)\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]\n  \
             runtime_type = \"io.containerd.moat.v2\"\n  \
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat.options]\n    \
             ConfigPath = \"/etc/moat/config.toml\"\n"
        )
    );
}

#[test]
fn another_runtime_name_and_no_config_path() {
    let entry = Entry {
        name: "moat-debug".into(),
        config_path: None,
    };
    let old = fixture("v3-runtimes.toml");
    let InstallPlan::Change { new, .. } =
        plan_install(Path::new(CONFIG), Some(&old), &entry, &mut never).unwrap()
    else {
        panic!("expected a change")
    };
    let added = only_added(&old, &new);
    assert!(added.contains("runtimes.moat-debug]"), "{added}");
    assert!(!added.contains("options"), "{added}");
    // `moat` (the default name) is not there; moat-debug is, and only it goes.
    assert_eq!(
        plan_uninstall(Path::new(CONFIG), Some(&new), "moat").unwrap(),
        UninstallPlan::Absent
    );
    match plan_uninstall(Path::new(CONFIG), Some(&new), "moat-debug").unwrap() {
        UninstallPlan::Change { new: Some(n), .. } => assert_eq!(n, old),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_runtime_the_user_wrote_is_left_alone() {
    let old = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]\n  runtime_type = \"io.containerd.moat.v2\"\n";
    match plan_install(Path::new(CONFIG), Some(old), &Entry::default(), &mut never).unwrap() {
        InstallPlan::Present(f) => assert!(!f.added_by_moat, "{f:?}"),
        other => panic!("{other:?}"),
    }
    match plan_uninstall(Path::new(CONFIG), Some(old), "moat").unwrap() {
        UninstallPlan::NotOurs(f) => assert_eq!(f.name, "moat"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_runtime_defined_in_an_import_is_found_there() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imports");
    let path = dir.join("config.toml");
    let old = fixture("imports/config.toml");
    match plan_install(&path, Some(&old), &Entry::default(), &mut never).unwrap() {
        InstallPlan::Present(f) => {
            assert_eq!(f.file, dir.join("conf.d/moat.toml"));
            assert!(!f.added_by_moat);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        plan_uninstall(&path, Some(&old), "moat").unwrap(),
        UninstallPlan::Absent
    );
    let s = scan(&path, &old).unwrap();
    assert_eq!(s.imports, [dir.join("conf.d/moat.toml")]);
    let names: Vec<&str> = s.runtimes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["runc", "moat"]);
}

#[test]
fn import_globs_expand_in_the_last_component() {
    let d = Dir::new("glob");
    fs::create_dir_all(d.0.join("conf.d")).unwrap();
    for f in ["b.toml", "a.toml", "c.txt"] {
        fs::write(d.0.join("conf.d").join(f), "version = 2\n").unwrap();
    }
    fs::write(d.0.join("conf.d/bad.toml"), "this is = = not toml").unwrap();
    let text = format!(
        "version = 2\nimports = [\"conf.d/?.toml\", \"{}/conf.d/b*\", \"gone.toml\"]\n",
        d.0.display()
    );
    let path = d.0.join("config.toml");
    let s = scan(&path, &text).unwrap();
    assert_eq!(
        s.imports,
        [
            d.0.join("conf.d/a.toml"),
            d.0.join("conf.d/b.toml"),
            d.0.join("conf.d/bad.toml"),
            d.0.join("gone.toml")
        ]
    );
    assert_eq!(s.bad_imports.len(), 1, "{:?}", s.bad_imports);
    assert_eq!(s.bad_imports[0].0, d.0.join("conf.d/bad.toml"));
    assert!(glob_match(b"*.toml", b"x.toml"));
    assert!(!glob_match(b"*.toml", b"x.toml.bak"));
    assert!(glob_match(b"a*b*c", b"aXXbYc"));
}

#[test]
fn a_file_without_version_gets_the_one_containerd_writes() {
    let old = "# node settings\nroot = \"/data/containerd\"\n";
    let mut asked = 0;
    let mut v3 = || {
        asked += 1;
        Ok(3)
    };
    let plan = plan_install(Path::new(CONFIG), Some(old), &Entry::default(), &mut v3).unwrap();
    assert_eq!(asked, 1);
    let InstallPlan::Change {
        new,
        format,
        added_version,
        ..
    } = plan
    else {
        panic!("expected a change")
    };
    assert_eq!(format, Format { version: 3 });
    assert!(added_version);
    assert!(new.starts_with(&format!(
        "# node settings\nroot = \"/data/containerd\"\nversion = 3 # {MARKER}\n"
    )));
    assert!(new.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.moat]"));
    assert!(
        new.contains("runtime_type = 'io.containerd.moat.v2'"),
        "{new}"
    );
    assert_eq!(uninstall(&new).as_deref(), Some(old));
}

#[test]
fn a_missing_file_is_created_and_removed_again() {
    let plan = plan_install(Path::new(CONFIG), None, &Entry::default(), &mut || Ok(2)).unwrap();
    let InstallPlan::Change { old, new, .. } = plan else {
        panic!("expected a change")
    };
    assert_eq!(old, None);
    assert!(
        new.starts_with(&format!("{CREATED_HEADER}\nversion = 2\n")),
        "{new}"
    );
    assert_eq!(uninstall(&new), None, "the whole file goes");
    // Something the user added since keeps it.
    let kept = format!("{new}\n[debug]\n  level = \"debug\"\n");
    let left = uninstall(&kept).expect("the file stays");
    assert!(left.contains("[debug]"), "{left}");
    assert!(!left.contains("moat.v2"), "{left}");
    assert_eq!(
        plan_uninstall(Path::new(CONFIG), None, "moat").unwrap(),
        UninstallPlan::Absent
    );
}

#[test]
fn versions_moat_does_not_edit_are_errors_that_say_what_to_do() {
    let err = |text: &str| {
        plan_install(Path::new(CONFIG), Some(text), &Entry::default(), &mut never)
            .unwrap_err()
            .to_string()
    };
    let e = err(&fixture("v1-no-version.toml"));
    assert!(
        e.contains("version 1") && e.contains("config migrate"),
        "{e}"
    );
    let e = err("version = 1\n");
    assert!(
        e.contains("version = 1") && e.contains("config migrate"),
        "{e}"
    );
    let e = err("version = 9\n");
    assert!(e.contains("version = 9") && e.contains("by hand"), "{e}");
    let e = err("version = \"2\"\n");
    assert!(e.contains("version = \"2\""), "{e}");
    let e = err("version = 2\n[plugins\n");
    assert!(e.contains("not valid TOML"), "{e}");
    let e = plan_install(
        Path::new(CONFIG),
        Some("root = \"/x\"\n"),
        &Entry::default(),
        &mut || {
            Err(ContainerdConfigError::NoContainerd {
                path: CONFIG.into(),
            })
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no containerd binary"), "{e}");
}

#[test]
fn an_inline_runtimes_table_is_not_edited() {
    let old = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  runtimes = { runc = { runtime_type = \"io.containerd.runc.v2\" } }\n";
    let e = plan_install(Path::new(CONFIG), Some(old), &Entry::default(), &mut never).unwrap_err();
    assert!(
        matches!(&e, ContainerdConfigError::NotATable { key, found: "an inline table", .. } if key.ends_with("containerd.runtimes")),
        "{e}"
    );
    assert!(e.to_string().contains("by hand"), "{e}");
}

#[test]
fn writes_are_atomic_keep_the_mode_and_back_up() {
    let d = Dir::new("write");
    let path = d.0.join("config.toml");
    fs::write(&path, "version = 2\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let backup = write_config(&path, Some("version = 2\n"), Some("version = 2\n# new\n")).unwrap();
    assert_eq!(backup, Some(d.0.join("config.toml.moat-backup")));
    assert_eq!(fs::read_to_string(&path).unwrap(), "version = 2\n# new\n");
    assert_eq!(
        fs::read_to_string(d.0.join("config.toml.moat-backup")).unwrap(),
        "version = 2\n"
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let names: Vec<String> = fs::read_dir(&d.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");

    // A link is followed: its target changes, the link stays.
    let real = d.0.join("real.toml");
    fs::write(&real, "version = 3\n").unwrap();
    let link = d.0.join("link.toml");
    symlink(&real, &link).unwrap();
    write_config(&link, Some("version = 3\n"), Some("version = 3\n# x\n")).unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(&real).unwrap(), "version = 3\n# x\n");
    assert!(d.0.join("real.toml.moat-backup").exists());

    // A new file in a new directory; and removal.
    let fresh = d.0.join("etc/containerd/config.toml");
    assert_eq!(
        write_config(&fresh, None, Some("version = 2\n")).unwrap(),
        None
    );
    assert_eq!(
        fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
        0o644
    );
    write_config(&fresh, Some("version = 2\n"), None).unwrap();
    assert!(!fresh.exists());
    assert!(d.0.join("etc/containerd/config.toml.moat-backup").exists());
    assert_eq!(read_config(&fresh).unwrap(), None);
}

#[test]
fn the_diff_is_unified() {
    let d = diff(Path::new("/c.toml"), "a\nb\n", "a\nb\nc\n");
    assert_eq!(
        d,
        "--- /c.toml (now)\n+++ /c.toml (new)\n@@ -1,2 +1,3 @@\n a\n b\n+c\n"
    );
}
