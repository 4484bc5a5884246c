//! VM configuration and the `moat-vmm` command line that fills it.

use std::path::PathBuf;

use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::tap;
use crate::seccomp::SeccompPolicy;

/// Where the guest console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout,
    /// Appended to a file (created if missing); a FIFO path works too.
    File(PathBuf),
    /// Discarded.
    None,
}

/// A host directory shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct FsShare {
    /// Mount tag the guest uses (`mount -t virtiofs TAG /mnt`), at most 36 bytes.
    pub tag: String,
    /// Host directory.
    pub dir: PathBuf,
}

/// A raw disk image exposed as virtio-blk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct BlkConfig {
    /// Host file.
    pub path: PathBuf,
    /// Open read-only and tell the guest so.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net device on an existing tap interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name (in the VMM's network namespace, see `VmConfig::netns`).
    pub tap: String,
    /// MAC address the guest sees; `None`: a random locally administered one.
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`.
    pub fn parse(v: &str) -> Result<Self, &'static str> {
        const WHY: &str = "tap=NAME[,mac=AA:BB:CC:DD:EE:FF]";
        let (mut name, mut mac) = (None, None);
        for kv in v.split(',') {
            match kv.split_once('=') {
                Some(("tap", n)) if name.is_none() => {
                    tap::check_name(n).map_err(|_| {
                        "a tap name of 1 to 15 bytes without '/', ',', '=', ':' or whitespace"
                    })?;
                    name = Some(n.to_string());
                }
                Some(("mac", m)) if mac.is_none() => mac = Some(m.parse()?),
                _ => return Err(WHY),
            }
        }
        Ok(Self {
            tap: name.ok_or(WHY)?,
            mac,
        })
    }
}

/// Host side of the vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Unix socket the VMM listens on (host-initiated connections); guest-initiated
    /// connections to port P go to `<uds>_P`.
    pub uds: PathBuf,
    /// Guest CID.
    pub cid: u64,
}

/// Confinement options (`--no-jail`, `--jail-uid`, `--jail-gid`, `--no-userns`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Confine the VMM (the default); `--no-jail` turns it off.
    pub enabled: bool,
    /// Run as this uid/gid instead of uid 0 without capabilities. The caller makes sure that
    /// uid/gid can open `/dev/kvm` and everything the configuration names.
    pub ids: Option<(u32, u32)>,
    /// Put the jailed VMM in a user namespace of its own with the identity uid/gid map, so
    /// that the capabilities it keeps act only there (the default); `--no-userns` keeps it in
    /// the caller's user namespace (docs/security.md says when that is needed).
    pub userns: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ids: None,
            userns: true,
        }
    }
}

/// Everything needed to build the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: ELF vmlinux (PVH note preferred) or bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Appended to the default kernel command line.
    pub cmdline_extra: Option<String>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Console destination.
    pub serial: SerialOut,
    /// vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares.
    pub fs: Vec<FsShare>,
    /// virtio-blk disks.
    pub blk: Vec<BlkConfig>,
    /// virtio-net devices, in guest order (eth0, eth1, ...).
    pub net: Vec<NetConfig>,
    /// Network namespace to join before attaching to the taps (`/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Control socket.
    pub api_sock: Option<PathBuf>,
    /// Wait for `{"cmd":"start"}` on the control socket before booting.
    pub defer_start: bool,
    /// Offer a virtio-rng device.
    pub rng: bool,
    /// Size of the virtio-mem hotplug region in MiB (0: no virtio-mem device). The guest can
    /// grow to `mem_mib` + this while running; `resize` on the control socket says how much.
    pub mem_hotplug_mib: u64,
    /// Offer a virtio-balloon device for free page reporting (memory the guest frees goes back
    /// to the host).
    pub balloon: bool,
    /// Seccomp filters on the VMM's threads (`--no-seccomp` turns them off).
    pub seccomp: SeccompPolicy,
    /// Confinement of the VMM process (`--no-jail`, `--jail-uid`, `--jail-gid`).
    pub jail: JailConfig,
}

/// Guest CID when none is given.
pub const DEFAULT_CID: u64 = 3;
/// Guest RAM when none is given.
pub const DEFAULT_MEM_MIB: u64 = 256;

/// The default kernel command line. `reboot=k` makes a guest reboot reach the i8042, which
/// ends the VMM; `panic=1` turns a panic into such a reboot one second later. A guest
/// power-off goes through ACPI (the PM1a control register, see `devices::legacy::acpi_pm`).
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.nokbd";

/// Command-line errors (exit status 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An option needs a value.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// An unknown option.
    #[error("unknown option {0}")]
    Unknown(String),
    /// A malformed value.
    #[error("invalid value {value:?} for {option}: {why}")]
    Invalid {
        /// The option.
        option: String,
        /// The value given.
        value: String,
        /// What is expected.
        why: &'static str,
    },
    /// `--kernel` is mandatory.
    #[error("--kernel PATH is required")]
    NoKernel,
    /// `--defer-start` needs somewhere to receive `start`.
    #[error("--defer-start needs --api-sock")]
    DeferWithoutApi,
    /// Two `--net` options name the same tap.
    #[error("tap {0} is given to more than one --net device")]
    DuplicateTap(String),
    /// `--no-userns` with `--no-jail`: the user namespace is part of the jail.
    #[error(
        "--no-userns cannot be combined with --no-jail (the user namespace is part of the jail)"
    )]
    UsernsWithoutJail,
    /// `--jail-uid`/`--jail-gid` with something that needs uid 0, or without the jail.
    #[error("--jail-uid/--jail-gid cannot be combined with {0} (see docs/security.md, \"VMM confinement\")")]
    JailIds(&'static str),
    /// Help was requested.
    #[error("help requested")]
    Help,
}

/// Usage text.
pub const USAGE: &str = "\
usage: moat-vmm --kernel PATH [--initrd PATH] [--cmdline EXTRA] [--vcpus N] [--mem-mib N]
                [--mem-hotplug-mib N]
                [--serial stdout|file:PATH|none] [--vsock-uds PATH] [--vsock-cid N]
                [--fs TAG=DIR]... [--blk PATH[:ro]]... [--no-rng] [--no-balloon]
                [--net tap=NAME[,mac=AA:BB:CC:DD:EE:FF]]... [--netns PATH]
                [--api-sock PATH [--defer-start]] [--no-seccomp]
                [--no-jail | [--jail-uid UID [--jail-gid GID]] [--no-userns]]
See docs/vmm.md for the control socket protocol and exit statuses.";

fn invalid(option: &str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::Invalid {
        option: option.to_string(),
        value: value.to_string(),
        why,
    }
}

/// Validates a virtio-fs tag.
pub fn check_fs_tag(tag: &str) -> Result<(), &'static str> {
    if tag.is_empty() || tag.len() > 36 {
        return Err("the tag must be 1 to 36 bytes");
    }
    Ok(())
}

impl VmConfig {
    /// Parses the arguments after the program name.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, ConfigError> {
        let mut kernel = None;
        let mut cfg = VmConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline_extra: None,
            vcpus: 1,
            mem_mib: DEFAULT_MEM_MIB,
            serial: SerialOut::Stdout,
            vsock: None,
            fs: Vec::new(),
            blk: Vec::new(),
            net: Vec::new(),
            netns: None,
            api_sock: None,
            defer_start: false,
            rng: true,
            mem_hotplug_mib: 0,
            balloon: true,
            seccomp: SeccompPolicy::Enforce,
            jail: JailConfig::default(),
        };
        let (mut jail_uid, mut jail_gid) = (None, None);
        let mut vsock_uds = None;
        let mut cid = DEFAULT_CID;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (opt, inline) = match arg.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            match opt.as_str() {
                "-h" | "--help" => return Err(ConfigError::Help),
                "--no-rng" => {
                    cfg.rng = false;
                    continue;
                }
                "--no-balloon" => {
                    cfg.balloon = false;
                    continue;
                }
                "--no-seccomp" => {
                    cfg.seccomp = SeccompPolicy::Off;
                    continue;
                }
                "--defer-start" => {
                    cfg.defer_start = true;
                    continue;
                }
                "--no-jail" => {
                    cfg.jail.enabled = false;
                    continue;
                }
                "--no-userns" => {
                    cfg.jail.userns = false;
                    continue;
                }
                _ => {}
            }
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| ConfigError::MissingValue(opt.clone()))
            };
            match opt.as_str() {
                "--kernel" => kernel = Some(PathBuf::from(value()?)),
                "--initrd" => cfg.initrd = Some(PathBuf::from(value()?)),
                "--cmdline" => cfg.cmdline_extra = Some(value()?),
                "--vcpus" => {
                    let v = value()?;
                    cfg.vcpus = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=crate::arch::x86_64::mptable::MAX_VCPUS).contains(n))
                        .ok_or_else(|| invalid(&opt, &v, "a vCPU count from 1 to 32"))?;
                }
                "--mem-hotplug-mib" => {
                    let v = value()?;
                    cfg.mem_hotplug_mib = v
                        .parse()
                        .ok()
                        .filter(|n: &u64| n.is_multiple_of(128) && *n <= 1 << 24)
                        .ok_or_else(|| invalid(&opt, &v, "a size in MiB, a multiple of 128"))?;
                }
                "--mem-mib" => {
                    let v = value()?;
                    cfg.mem_mib = v
                        .parse()
                        .ok()
                        .filter(|n| *n >= 64)
                        .ok_or_else(|| invalid(&opt, &v, "a size in MiB, at least 64"))?;
                }
                "--serial" => {
                    let v = value()?;
                    cfg.serial = match v.as_str() {
                        "stdout" => SerialOut::Stdout,
                        "none" => SerialOut::None,
                        s => match s.strip_prefix("file:") {
                            Some(p) if !p.is_empty() => SerialOut::File(PathBuf::from(p)),
                            _ => return Err(invalid(&opt, &v, "stdout, none or file:PATH")),
                        },
                    };
                }
                "--vsock-uds" => vsock_uds = Some(PathBuf::from(value()?)),
                "--vsock-cid" => {
                    let v = value()?;
                    cid = v
                        .parse()
                        .ok()
                        .filter(|c| *c >= 3 && *c < u64::from(u32::MAX))
                        .ok_or_else(|| invalid(&opt, &v, "a CID from 3 to 4294967294"))?;
                }
                "--fs" => {
                    let v = value()?;
                    let (tag, dir) = v
                        .split_once('=')
                        .filter(|(_, d)| !d.is_empty())
                        .ok_or_else(|| invalid(&opt, &v, "TAG=DIR"))?;
                    check_fs_tag(tag).map_err(|why| invalid(&opt, &v, why))?;
                    cfg.fs.push(FsShare {
                        tag: tag.to_string(),
                        dir: PathBuf::from(dir),
                    });
                }
                "--blk" => {
                    let v = value()?;
                    let (path, read_only) = match v.strip_suffix(":ro") {
                        Some(p) => (p, true),
                        None => (v.strip_suffix(":rw").unwrap_or(&v), false),
                    };
                    if path.is_empty() {
                        return Err(invalid(&opt, &v, "PATH[:ro]"));
                    }
                    cfg.blk.push(BlkConfig {
                        path: PathBuf::from(path),
                        read_only,
                    });
                }
                "--net" => {
                    let v = value()?;
                    let net = NetConfig::parse(&v).map_err(|why| invalid(&opt, &v, why))?;
                    if cfg.net.iter().any(|n| n.tap == net.tap) {
                        return Err(ConfigError::DuplicateTap(net.tap));
                    }
                    cfg.net.push(net);
                }
                "--netns" => {
                    let v = value()?;
                    if v.is_empty() {
                        return Err(invalid(&opt, &v, "a network namespace file"));
                    }
                    cfg.netns = Some(PathBuf::from(v));
                }
                "--api-sock" => cfg.api_sock = Some(PathBuf::from(value()?)),
                "--jail-uid" | "--jail-gid" => {
                    let v = value()?;
                    let id = v
                        .parse::<u32>()
                        .ok()
                        .filter(|id| *id != 0 && *id != u32::MAX)
                        .ok_or_else(|| invalid(&opt, &v, "a numeric id other than 0"))?;
                    if opt == "--jail-uid" {
                        jail_uid = Some(id);
                    } else {
                        jail_gid = Some(id);
                    }
                }
                _ => return Err(ConfigError::Unknown(arg)),
            }
        }
        cfg.kernel = kernel.ok_or(ConfigError::NoKernel)?;
        cfg.vsock = vsock_uds.map(|uds| VsockConfig { uds, cid });
        if cfg.defer_start && cfg.api_sock.is_none() {
            return Err(ConfigError::DeferWithoutApi);
        }
        if !cfg.jail.userns && !cfg.jail.enabled {
            return Err(ConfigError::UsernsWithoutJail);
        }
        match (jail_uid, jail_gid) {
            (None, None) => {}
            (None, Some(_)) => return Err(ConfigError::JailIds("a missing --jail-uid")),
            (Some(uid), gid) => {
                if !cfg.jail.enabled {
                    return Err(ConfigError::JailIds("--no-jail"));
                }
                if !cfg.fs.is_empty() || cfg.defer_start {
                    // The virtio-fs server acts as the guest's users: it needs uid 0.
                    return Err(ConfigError::JailIds("--fs or --defer-start"));
                }
                cfg.jail.ids = Some((uid, gid.unwrap_or(uid)));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn full_command_line() {
        let c = parse(
            "--kernel /k --initrd=/i --cmdline quiet --vcpus 2 --mem-mib 512 --mem-hotplug-mib 1024 \
             --serial file:/tmp/s \
             --vsock-uds /tmp/v --vsock-cid 7 --fs root=/srv --fs b=/x --blk /d:ro --blk /e \
             --api-sock /tmp/a --defer-start --no-rng --no-balloon --no-seccomp --net tap=tap0 \
             --net=tap=tap1,mac=02:00:00:aa:bb:cc --netns /run/netns/pod",
        )
        .unwrap();
        assert_eq!(
            c.net,
            vec![
                NetConfig {
                    tap: "tap0".into(),
                    mac: None
                },
                NetConfig {
                    tap: "tap1".into(),
                    mac: Some(MacAddr([2, 0, 0, 0xaa, 0xbb, 0xcc]))
                }
            ]
        );
        assert_eq!(c.netns, Some(PathBuf::from("/run/netns/pod")));
        assert_eq!(c.mem_hotplug_mib, 1024);
        assert!(parse("--kernel /k --mem-hotplug-mib 100").is_err());
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.seccomp, SeccompPolicy::Off);
        assert_eq!(
            parse("--kernel /k").unwrap().seccomp,
            SeccompPolicy::Enforce
        );
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.cmdline_extra.as_deref(), Some("quiet"));
        assert_eq!((c.vcpus, c.mem_mib), (2, 512));
        assert_eq!(c.serial, SerialOut::File("/tmp/s".into()));
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                uds: "/tmp/v".into(),
                cid: 7
            })
        );
        assert_eq!(c.fs.len(), 2);
        assert_eq!(c.fs[0].tag, "root");
        assert_eq!(
            c.blk[0],
            BlkConfig {
                path: "/d".into(),
                read_only: true
            }
        );
        assert!(!c.blk[1].read_only);
        assert!(c.defer_start && !c.rng && !c.balloon);
    }

    #[test]
    fn defaults() {
        let c = parse("--kernel /k").unwrap();
        assert_eq!(
            (c.vcpus, c.mem_mib, c.rng, c.balloon),
            (1, DEFAULT_MEM_MIB, true, true)
        );
        assert_eq!(c.serial, SerialOut::Stdout);
        assert_eq!(c.vsock, None);
        assert!(c.net.is_empty() && c.netns.is_none());
        assert_eq!(c.jail, JailConfig::default());
        assert!(c.jail.enabled && c.jail.ids.is_none() && c.jail.userns);
    }

    #[test]
    fn jail_options() {
        assert!(!parse("--kernel /k --no-jail").unwrap().jail.enabled);
        let c = parse("--kernel /k --fs t=/d --no-userns").unwrap();
        assert!(c.jail.enabled && !c.jail.userns);
        assert_eq!(
            parse("--kernel /k --no-userns --no-jail"),
            Err(ConfigError::UsernsWithoutJail)
        );
        let c = parse("--kernel /k --jail-uid 1000 --jail-gid=994").unwrap();
        assert_eq!(c.jail.ids, Some((1000, 994)));
        let c = parse("--kernel /k --jail-uid 65534").unwrap();
        assert_eq!(c.jail.ids, Some((65534, 65534)));
        for bad in ["--jail-uid 0", "--jail-uid x", "--jail-gid -1 --jail-uid 1"] {
            assert!(
                matches!(
                    parse(&format!("--kernel /k {bad}")),
                    Err(ConfigError::Invalid { .. })
                ),
                "{bad}"
            );
        }
        for bad in [
            "--jail-gid 5",
            "--jail-uid 5 --no-jail",
            "--jail-uid 5 --fs t=/d",
            "--jail-uid 5 --api-sock /a --defer-start",
        ] {
            assert!(
                matches!(
                    parse(&format!("--kernel /k {bad}")),
                    Err(ConfigError::JailIds(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn errors() {
        assert_eq!(parse(""), Err(ConfigError::NoKernel));
        assert_eq!(
            parse("--kernel"),
            Err(ConfigError::MissingValue("--kernel".into()))
        );
        assert_eq!(
            parse("--kernel /k --bogus"),
            Err(ConfigError::Unknown("--bogus".into()))
        );
        assert!(matches!(
            parse("--kernel /k --vcpus 0"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --vcpus 33"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --mem-mib 8"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --serial tty"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --fs nodir"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --fs 0123456789012345678901234567890123456=/d"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            parse("--kernel /k --vsock-cid 2"),
            Err(ConfigError::Invalid { .. })
        ));
        assert_eq!(
            parse("--kernel /k --defer-start"),
            Err(ConfigError::DeferWithoutApi)
        );
        for bad in [
            "",
            "tap0",
            "tap=",
            "tap=0123456789abcdef",
            "tap=a/b",
            "mac=02:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,tap=u",
            "tap=t,speed=10",
        ] {
            assert!(
                matches!(
                    parse(&format!("--kernel /k --net={bad}")),
                    Err(ConfigError::Invalid { .. })
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse("--kernel /k --net tap=t --net tap=t,mac=02:00:00:00:00:01"),
            Err(ConfigError::DuplicateTap("t".into()))
        );
        assert_eq!(
            parse("--kernel /k --netns"),
            Err(ConfigError::MissingValue("--netns".into()))
        );
        assert_eq!(parse("--help"), Err(ConfigError::Help));
    }
}
