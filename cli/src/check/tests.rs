//! Tests of `moat check` on fabricated trees.

use super::*;

fn tree(modules: &[&str], kvm: bool) -> TempDir {
    let d = TempDir::new("check");
    for m in modules {
        fs::create_dir_all(d.0.join("sys/module").join(m)).unwrap();
    }
    fs::create_dir_all(d.0.join("dev")).unwrap();
    if kvm {
        fs::write(d.0.join("dev/kvm"), b"").unwrap();
    }
    d
}

use moat_test_support::TempDir;

#[test]
fn pvm_and_missing_kvm_fail_with_advice() {
    let pvm = check_kvm(&tree(&["kvm_pvm"], true).0);
    assert_eq!(pvm[0].verdict, Verdict::Fail);
    assert!(
        pvm[0].text.contains("hardware virtualization"),
        "{}",
        pvm[0]
    );
    let none = check_kvm(&tree(&[], false).0);
    assert_eq!(none.len(), 1);
    assert_eq!(none[0].verdict, Verdict::Fail);
    assert!(none[0].text.contains("modprobe"), "{}", none[0]);
}

#[test]
fn guest_images_are_checked_for_presence_format_and_options() {
    let d = TempDir::new("check");
    let config = Config {
        vmm: d.0.join("moat-vmm"),
        kernel: d.0.join("vmlinux"),
        initrd: d.0.join("initramfs.cpio"),
        ..Config::default()
    };
    let items = check_guest(&config);
    assert!(
        items.iter().all(|i| i.verdict == Verdict::Fail),
        "{items:?}"
    );

    fs::write(&config.vmm, b"").unwrap();
    fs::write(&config.kernel, b"MZ not an elf").unwrap();
    fs::write(&config.initrd, [0x1f, 0x8b, 0x08]).unwrap();
    let items = check_guest(&config);
    assert_eq!(items[0].verdict, Verdict::Ok);
    assert_eq!(items[1].verdict, Verdict::Fail, "{}", items[1]);
    assert_eq!(items[2].verdict, Verdict::Ok);

    fs::write(&config.kernel, b"\x7fELF....").unwrap();
    // Installed kernels come without their config: no warning about it.
    let items = check_guest(&config);
    assert_eq!(items[1].verdict, Verdict::Ok, "{}", items[1]);
    assert!(!items[1].text.contains("vmlinux.config"), "{}", items[1]);
    fs::write(
        d.0.join("vmlinux.config"),
        "CONFIG_PVH=y\nCONFIG_VIRTIO_MMIO=y\n",
    )
    .unwrap();
    let items = check_guest(&config);
    assert_eq!(items[1].verdict, Verdict::Fail);
    assert!(items[1].text.contains("CONFIG_VIRTIO_FS=y"), "{}", items[1]);

    fs::write(
        d.0.join("vmlinux.config"),
        REQUIRED_KERNEL_OPTIONS.join("\n"),
    )
    .unwrap();
    assert_eq!(check_guest(&config)[1].verdict, Verdict::Ok);
}

fn write(root: &Path, path: &str, text: &str) {
    let p = root.join(path);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

#[test]
fn host_network_features_ok_when_loaded_or_built_in() {
    let d = TempDir::new("check");
    write(
        &d.0,
        "proc/modules",
        "sch_ingress 16384 2 - Live 0x0\ncls_u32 28672 2 - Live 0x0\nact_mirred 24576 2 - Live 0x0\n",
    );
    write(&d.0, "proc/sys/kernel/osrelease", "6.1.0-57-amd64\n");
    write(
        &d.0,
        "lib/modules/6.1.0-57-amd64/modules.builtin",
        "kernel/drivers/net/tun.ko\n",
    );
    write(&d.0, "dev/net/tun", "");
    write(&d.0, "proc/filesystems", "nodev\ttmpfs\nnodev\toverlay\n");
    let items = check_host_network(&d.0);
    let names: Vec<&str> = items.iter().map(|i| i.name).collect();
    assert_eq!(
        names,
        ["tc ingress", "tc u32", "tc mirred", "tun", "overlay"]
    );
    assert!(items.iter().all(|i| i.verdict == Verdict::Ok), "{items:#?}");
    assert!(
        items[3].text.contains("built into the kernel"),
        "{}",
        items[3]
    );
}

#[test]
fn missing_host_network_features_fail_with_the_module_to_load() {
    let d = TempDir::new("check");
    write(&d.0, "proc/modules", "");
    write(&d.0, "proc/sys/kernel/osrelease", "6.1.0-57-amd64\n");
    write(&d.0, "lib/modules/6.1.0-57-amd64/modules.builtin", "");
    write(
        &d.0,
        "lib/modules/6.1.0-57-amd64/modules.dep",
        "kernel/net/sched/sch_ingress.ko.xz:\nkernel/drivers/net/tun.ko.xz:\n",
    );
    write(
        &d.0,
        "boot/config-6.1.0-57-amd64",
        "CONFIG_NET_SCH_INGRESS=m\nCONFIG_NET_CLS_U32=m\n# CONFIG_NET_ACT_MIRRED is not set\nCONFIG_TUN=m\nCONFIG_OVERLAY_FS=m\n",
    );
    let items = check_host_network(&d.0);
    let by = |name: &str| items.iter().find(|i| i.name == name).unwrap().clone();
    // Installed, not loaded: the shim loads it; fine.
    assert_eq!(by("tc ingress").verdict, Verdict::Ok);
    assert!(
        by("tc ingress").text.contains("modprobe sch_ingress"),
        "{}",
        by("tc ingress")
    );
    // =m but not installed, and not built at all: fail, saying what to do.
    assert_eq!(by("tc u32").verdict, Verdict::Fail);
    assert!(
        by("tc u32")
            .text
            .contains("linux-modules-extra-6.1.0-57-amd64"),
        "{}",
        by("tc u32")
    );
    assert_eq!(by("tc mirred").verdict, Verdict::Fail);
    assert!(
        by("tc mirred").text.contains("CONFIG_NET_ACT_MIRRED"),
        "{}",
        by("tc mirred")
    );
    // Loadable but no device node yet.
    assert_eq!(by("tun").verdict, Verdict::Warn);
    assert!(by("tun").text.contains("/dev/net/tun"), "{}", by("tun"));
    // Not registered, =m, not in modules.dep: not installed.
    assert_eq!(by("overlay").verdict, Verdict::Fail);
    assert!(
        by("overlay").text.contains("overlayfs unavailable"),
        "{}",
        by("overlay")
    );
}

#[test]
fn host_network_feature_in_no_module_list_fails() {
    let d = TempDir::new("check");
    write(&d.0, "proc/modules", "");
    write(&d.0, "proc/sys/kernel/osrelease", "6.8.0-1-generic\n");
    write(&d.0, "lib/modules/6.8.0-1-generic/modules.builtin", "");
    write(&d.0, "lib/modules/6.8.0-1-generic/modules.dep", "");
    let items = check_host_network(&d.0);
    assert_eq!(items[2].name, "tc mirred");
    assert_eq!(items[2].verdict, Verdict::Fail, "{}", items[2]);
    assert!(
        items[2]
            .text
            .contains("linux-modules-extra-6.8.0-1-generic"),
        "{}",
        items[2]
    );
}

#[test]
fn unknown_host_network_features_warn() {
    let d = TempDir::new("check");
    let items = check_host_network(&d.0);
    assert!(
        items.iter().all(|i| i.verdict == Verdict::Warn),
        "{items:#?}"
    );
    assert!(
        items[0].text.contains("no loadable modules"),
        "{}",
        items[0]
    );
    write(&d.0, "proc/modules", "");
    let items = check_host_network(&d.0);
    assert!(
        items.iter().all(|i| i.verdict == Verdict::Warn),
        "{items:#?}"
    );
    assert!(
        items[0].text.contains("modprobe sch_ingress"),
        "{}",
        items[0]
    );
}

/// A process in a fabricated /proc: its command line and a stat line (parent, start time).
fn fake_process(root: &Path, pid: u32, argv: &[&str]) {
    let dir = root.join("proc").join(pid.to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("cmdline"), argv.join("\0") + "\0").unwrap();
    fs::write(
        dir.join("stat"),
        format!("{pid} (containerd) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"),
    )
    .unwrap();
}

const MOAT_TABLE: &str = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.moat]\n  runtime_type = \"io.containerd.moat.v2\"\n";

#[test]
fn containerd_config_is_the_one_containerd_runs_with() {
    let d = TempDir::new("check");
    // containerd started after the files were written (boot time: now).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    write(&d.0, "proc/stat", &format!("btime {now}\n"));
    // The default file has moat, but the running containerd reads another one.
    write(
        &d.0,
        "etc/containerd/config.toml",
        &format!("version = 2\n{MOAT_TABLE}"),
    );
    fake_process(
        &d.0,
        300,
        &["/usr/bin/containerd", "--config", "/srv/containerd.toml"],
    );
    let items = check_containerd_config(&d.0, None);
    assert_eq!(items[0].verdict, Verdict::Warn, "{items:#?}");
    assert!(
        items[0].text.contains("no /srv/containerd.toml"),
        "{}",
        items[0]
    );
    assert!(items[0].text.contains("pid 300"), "{}", items[0]);
    assert!(items[0].text.contains("moat install"), "{}", items[0]);

    write(&d.0, "srv/containerd.toml", "version = 2\n");
    let items = check_containerd_config(&d.0, None);
    assert_eq!(items[0].verdict, Verdict::Warn, "{items:#?}");
    assert!(
        items[0]
            .text
            .contains("has no runtime of type io.containerd.moat.v2"),
        "{}",
        items[0]
    );

    // From an import, relative to the file.
    write(
        &d.0,
        "srv/containerd.toml",
        "version = 2\nimports = [\"conf.d/*.toml\"]\n",
    );
    write(
        &d.0,
        "srv/conf.d/moat.toml",
        &format!("version = 2\n{MOAT_TABLE}"),
    );
    let items = check_containerd_config(&d.0, None);
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0].verdict, Verdict::Ok, "{items:#?}");
    assert!(
        items[0]
            .text
            .contains("has runtime moat (io.containerd.moat.v2)"),
        "{}",
        items[0]
    );
    assert!(items[0].text.contains("from the import"), "{}", items[0]);
    assert!(
        items[0]
            .text
            .contains("the --config of the running containerd, pid 300"),
        "{}",
        items[0]
    );
}

#[test]
fn a_containerd_older_than_its_config_must_restart() {
    let d = TempDir::new("check");
    // containerd started 1 s after boot, in 1970; the config was written now.
    write(&d.0, "proc/stat", "btime 0\n");
    fake_process(&d.0, 300, &["containerd"]);
    write(
        &d.0,
        "etc/containerd/config.toml",
        &format!("version = 2\n{MOAT_TABLE}"),
    );
    let items = check_containerd_config(&d.0, None);
    assert_eq!(items[0].verdict, Verdict::Ok, "{items:#?}");
    let restart = items
        .iter()
        .find(|i| i.text.contains("systemctl restart containerd"));
    assert!(
        restart.is_some_and(|i| i.verdict == Verdict::Warn),
        "{items:#?}"
    );
}

#[test]
fn containerd_config_confirmed_by_the_real_containerd() {
    let bin = Path::new("/usr/bin/containerd");
    if !bin.is_file() {
        moat_test_support::skip("no /usr/bin/containerd (Debian's containerd package)");
        return;
    }
    let d = TempDir::new("check");
    write(
        &d.0,
        "etc/containerd/config.toml",
        &format!("version = 2\n{MOAT_TABLE}"),
    );
    let items = check_containerd_config(&d.0, Some(bin));
    assert_eq!(items[0].verdict, Verdict::Ok, "{items:#?}");
    assert!(
        items[0].text.contains("config dump` confirms"),
        "{}",
        items[0]
    );
    assert!(
        items[0].text.contains("no running containerd found"),
        "{}",
        items[0]
    );
    // containerd 1.6 reads a version 3 file without its CRI runtime plugin: said so.
    write(&d.0, "etc/containerd/config.toml", "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.moat]\n  runtime_type = 'io.containerd.moat.v2'\n");
    let items = check_containerd_config(&d.0, Some(bin));
    assert_eq!(items[0].verdict, Verdict::Warn, "{items:#?}");
    assert!(items[0].text.contains("does not show it"), "{}", items[0]);
    // One it cannot read at all.
    write(
        &d.0,
        "etc/containerd/config.toml",
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = 5\n",
    );
    let items = check_containerd_config(&d.0, Some(bin));
    assert!(
        items
            .iter()
            .any(|i| i.verdict == Verdict::Warn && i.text.contains("cannot read")),
        "{items:#?}"
    );
}

#[test]
fn vsock_needs_no_host_module() {
    let d = TempDir::new("check");
    let i = check_vsock(&d.0);
    assert_eq!(i.verdict, Verdict::Ok);
    assert!(
        i.text.contains("hybrid vsock") && i.text.contains("need not be"),
        "{i}"
    );
    write(&d.0, "proc/modules", "vhost_vsock 24576 0 - Live 0x0\n");
    assert!(check_vsock(&d.0).text.contains("vhost_vsock is loaded"));
}
