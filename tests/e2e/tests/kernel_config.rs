//! Host-side check of the guest kernel configuration.
//!
//! Owns one question: does the `.config` that `guest-kernel-config/build` produced contain every
//! option the fragments in `guest-kernel-config/fragments/` ask for? Kconfig silently drops an
//! option whose dependencies are not met (and `olddefconfig` does not complain), so a fragment
//! can say `CONFIG_VIRTIO_FS=y` while the kernel has no virtio-fs at all. This test reads the
//! fragments and the built config (`target/guest/vmlinux.config`, or `$MOAT_GUEST_KERNEL.config`
//! when `MOAT_GUEST_KERNEL` points at another kernel) and fails listing every dropped option.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// What a fragment line or a `.config` line says about one option.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Setting {
    /// `CONFIG_X=value` (value as written, e.g. `y`, `64`, `"text"`).
    Value(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Setting::Value(v) => write!(f, "={v}"),
            Setting::NotSet => f.write_str(" is not set"),
        }
    }
}

/// One option requested by a fragment, with where it was requested.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    name: String,
    setting: Setting,
    origin: String,
}

/// Why the check could not run or did not pass.
#[derive(Debug)]
enum CheckError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    ConfigMissing {
        path: PathBuf,
    },
    NoFragments {
        dir: PathBuf,
    },
    BadLine {
        origin: String,
        line: String,
    },
    Conflict {
        name: String,
        first: String,
        second: String,
    },
    Dropped(Vec<String>),
    MissingReason(Vec<String>),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            CheckError::ConfigMissing { path } => write!(
                f,
                "built kernel config {} does not exist; run `guest-kernel-config/build` first",
                path.display()
            ),
            CheckError::NoFragments { dir } => {
                write!(f, "no *.config fragments in {}", dir.display())
            }
            CheckError::BadLine { origin, line } => {
                write!(f, "{origin}: not a Kconfig line: {line:?}")
            }
            CheckError::Conflict {
                name,
                first,
                second,
            } => {
                write!(
                    f,
                    "{name} is requested twice with different values: {first} and {second}"
                )
            }
            CheckError::Dropped(list) => write!(
                f,
                "{} option(s) requested by the fragments are not in the built config \
                 (Kconfig dropped them: a missing dependency or a misspelled name; or the \
                 build is older than the fragments: rerun guest-kernel-config/build):\n  {}",
                list.len(),
                list.join("\n  ")
            ),
            CheckError::MissingReason(list) => write!(
                f,
                "option group(s) without a one-line `# reason` comment above them:\n  {}",
                list.join("\n  ")
            ),
        }
    }
}

/// Parses one Kconfig line; `Ok(None)` for blank lines and ordinary comments.
fn parse_line(line: &str) -> Result<Option<(String, Setting)>, ()> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix("# CONFIG_") {
        return match rest.strip_suffix(" is not set") {
            Some(name) if is_symbol(name) => Ok(Some((format!("CONFIG_{name}"), Setting::NotSet))),
            _ => Ok(None),
        };
    }
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    match line.split_once('=') {
        Some((name, value))
            if name.starts_with("CONFIG_") && is_symbol(&name[7..]) && !value.is_empty() =>
        {
            Ok(Some((name.to_string(), Setting::Value(value.to_string()))))
        }
        _ => Err(()),
    }
}

fn is_symbol(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Reads the requests of one fragment; `origin_name` labels them in messages.
fn parse_fragment(origin_name: &str, text: &str) -> Result<Vec<Request>, CheckError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let origin = format!("{origin_name}:{}", index + 1);
        match parse_line(line) {
            Ok(Some((name, setting))) => out.push(Request {
                name,
                setting,
                origin,
            }),
            Ok(None) => {}
            Err(()) => {
                return Err(CheckError::BadLine {
                    origin,
                    line: line.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Every group of option lines (a run without blank lines) must start after a `# ` comment.
fn groups_without_reason(origin_name: &str, text: &str) -> Vec<String> {
    let mut missing = Vec::new();
    let mut previous = "";
    for (index, line) in text.lines().enumerate() {
        let is_option = matches!(parse_line(line), Ok(Some(_)));
        let previous_is_option = matches!(parse_line(previous), Ok(Some(_)));
        if is_option && !previous_is_option && !previous.trim_start().starts_with('#') {
            missing.push(format!("{origin_name}:{}: {}", index + 1, line.trim()));
        }
        previous = line;
    }
    missing
}

/// Reads a `.config` into name -> setting (later lines win, as in Kconfig).
fn parse_config(text: &str) -> BTreeMap<String, Setting> {
    text.lines()
        .filter_map(|line| parse_line(line).ok().flatten())
        .collect()
}

/// Returns one message per request the config does not honour.
fn dropped(requests: &[Request], config: &BTreeMap<String, Setting>) -> Vec<String> {
    requests
        .iter()
        .filter_map(|r| {
            let actual = config.get(&r.name);
            let honoured = match (&r.setting, actual) {
                (Setting::NotSet, None) | (Setting::NotSet, Some(Setting::NotSet)) => true,
                (wanted, Some(got)) => wanted == got,
                (Setting::Value(_), None) => false,
            };
            (!honoured).then(|| {
                let got = match actual {
                    Some(setting) => format!("{}{setting}", r.name),
                    None => "absent (its menu or dependencies are off)".to_string(),
                };
                format!(
                    "{}{}  [{}]  -> built config: {got}",
                    r.name, r.setting, r.origin
                )
            })
        })
        .collect()
}

/// Rejects an option requested twice with different settings (merge order would decide silently).
fn check_conflicts(requests: &[Request]) -> Result<(), CheckError> {
    let mut seen: BTreeMap<&str, &Request> = BTreeMap::new();
    for r in requests {
        if let Some(first) = seen.insert(&r.name, r) {
            if first.setting != r.setting {
                return Err(CheckError::Conflict {
                    name: r.name.clone(),
                    first: format!("{}{} ({})", first.name, first.setting, first.origin),
                    second: format!("{}{} ({})", r.name, r.setting, r.origin),
                });
            }
        }
    }
    Ok(())
}

fn workspace() -> PathBuf {
    // CARGO_MANIFEST_DIR is <workspace>/tests/e2e.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

fn read(path: &Path) -> Result<String, CheckError> {
    fs::read_to_string(path).map_err(|source| CheckError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The fragments, in the order the build merges them (file name order).
fn load_fragments() -> Result<Vec<(String, String)>, CheckError> {
    let dir = workspace().join("guest-kernel-config/fragments");
    let entries = fs::read_dir(&dir).map_err(|source| CheckError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| CheckError::Read {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "config") {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(CheckError::NoFragments { dir });
    }
    paths
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            read(&path).map(|text| (name, text))
        })
        .collect()
}

fn built_config_path() -> PathBuf {
    match std::env::var_os("MOAT_GUEST_KERNEL") {
        Some(kernel) => {
            let mut path = kernel;
            path.push(".config");
            PathBuf::from(path)
        }
        None => workspace().join("target/guest/vmlinux.config"),
    }
}

fn check_built_config() -> Result<usize, CheckError> {
    let mut requests = Vec::new();
    for (name, text) in load_fragments()? {
        requests.extend(parse_fragment(&name, &text)?);
    }
    check_conflicts(&requests)?;
    let path = built_config_path();
    if !path.exists() {
        return Err(CheckError::ConfigMissing { path });
    }
    let config = parse_config(&read(&path)?);
    let dropped = dropped(&requests, &config);
    if dropped.is_empty() {
        Ok(requests.len())
    } else {
        Err(CheckError::Dropped(dropped))
    }
}

#[test]
fn built_config_has_every_fragment_option() {
    match check_built_config() {
        Ok(count) => assert!(count > 0, "the fragments request no options"),
        Err(e) => panic!("{e}"),
    }
}

/// Guest power-off (docs/vmm.md, "ACPI") needs more than the fragments spell out: options that
/// follow from them (`def_bool`s) and ones that must stay off. Checked on the built config.
#[test]
fn built_config_can_power_off_through_acpi() {
    let path = built_config_path();
    if !path.exists() {
        panic!("{}", CheckError::ConfigMissing { path });
    }
    let config = parse_config(&read(&path).unwrap_or_else(|e| panic!("{e}")));
    let yes = Setting::Value("y".to_string());
    let wanted = [
        // The interpreter, and PCI for its default PCI_Config region handler (without it no
        // table loads).
        ("CONFIG_ACPI", true),
        ("CONFIG_PCI", true),
        // drivers/acpi/sleep.c: registers the S5 power-off handler when the DSDT has `_S5`.
        ("CONFIG_ACPI_SYSTEM_POWER_STATES_SUPPORT", true),
        // COM1 for hardware-reduced ACPI VMMs (QEMU microvm), which describe it in the DSDT only.
        ("CONFIG_SERIAL_8250_PNP", true),
        // Would ignore moat-vmm's fixed-hardware PM1 registers.
        ("CONFIG_ACPI_REDUCED_HARDWARE_ONLY", false),
    ];
    let wrong: Vec<String> = wanted
        .iter()
        .filter(|(name, on)| (config.get(*name) == Some(&yes)) != *on)
        .map(|(name, on)| format!("{name} should be {}", if *on { "y" } else { "off" }))
        .collect();
    assert!(wrong.is_empty(), "{}: {}", path.display(), wrong.join(", "));
}

/// What pods run inside their VM (issue 17): iptables-nft and iptables-legacy (IPv4 and IPv6)
/// with NAT, REDIRECT and TPROXY (Istio), conntrack, the common xt matches; bridges with
/// br_netfilter, veth, tun/tap, VLANs, macvlan/ipvlan (Docker-in-Docker, CNI plugins in a pod);
/// FUSE (`/dev/fuse`) and overlayfs. Checked on the built config, independently of which fragment
/// asks for them, so that trimming a fragment cannot silently take one away; options selected
/// by others (e.g. `NF_TPROXY_IPV6`, `NF_NAT_MASQUERADE`) are listed too.
#[test]
fn built_config_has_what_pods_run() {
    let path = built_config_path();
    if !path.exists() {
        panic!("{}", CheckError::ConfigMissing { path });
    }
    let config = parse_config(&read(&path).unwrap_or_else(|e| panic!("{e}")));
    let yes = Setting::Value("y".to_string());
    let wanted = [
        // netfilter core, conntrack, NAT.
        "CONFIG_NETFILTER",
        "CONFIG_NETFILTER_ADVANCED",
        "CONFIG_NF_CONNTRACK",
        "CONFIG_NF_CONNTRACK_MARK",
        "CONFIG_NF_CT_NETLINK",
        "CONFIG_NF_NAT",
        "CONFIG_NF_NAT_MASQUERADE",
        "CONFIG_NF_NAT_REDIRECT",
        "CONFIG_NF_TPROXY_IPV4",
        "CONFIG_NF_TPROXY_IPV6",
        "CONFIG_NF_SOCKET_IPV4",
        "CONFIG_NF_SOCKET_IPV6",
        // nf_tables (nft, iptables-nft: NFT_COMPAT runs the xt extensions).
        "CONFIG_NF_TABLES",
        "CONFIG_NF_TABLES_INET",
        "CONFIG_NF_TABLES_IPV4",
        "CONFIG_NF_TABLES_IPV6",
        "CONFIG_NFT_COMPAT",
        "CONFIG_NFT_CT",
        "CONFIG_NFT_NAT",
        "CONFIG_NFT_MASQ",
        "CONFIG_NFT_REDIR",
        "CONFIG_NFT_REJECT",
        "CONFIG_NFT_TPROXY",
        "CONFIG_NFT_SOCKET",
        // x_tables targets and matches.
        "CONFIG_NETFILTER_XTABLES",
        "CONFIG_NETFILTER_XT_MARK",
        "CONFIG_NETFILTER_XT_CONNMARK",
        "CONFIG_NETFILTER_XT_NAT",
        "CONFIG_NETFILTER_XT_TARGET_MASQUERADE",
        "CONFIG_NETFILTER_XT_TARGET_REDIRECT",
        "CONFIG_NETFILTER_XT_TARGET_TPROXY",
        "CONFIG_NETFILTER_XT_TARGET_CT",
        "CONFIG_NETFILTER_XT_MATCH_ADDRTYPE",
        "CONFIG_NETFILTER_XT_MATCH_COMMENT",
        "CONFIG_NETFILTER_XT_MATCH_CONNTRACK",
        "CONFIG_NETFILTER_XT_MATCH_MARK",
        "CONFIG_NETFILTER_XT_MATCH_MULTIPORT",
        "CONFIG_NETFILTER_XT_MATCH_OWNER",
        "CONFIG_NETFILTER_XT_MATCH_SOCKET",
        "CONFIG_NETFILTER_XT_MATCH_STATISTIC",
        // iptables-legacy / ip6tables-legacy tables.
        "CONFIG_IP_NF_IPTABLES",
        "CONFIG_IP_NF_FILTER",
        "CONFIG_IP_NF_NAT",
        "CONFIG_IP_NF_MANGLE",
        "CONFIG_IP_NF_RAW",
        "CONFIG_IP_NF_TARGET_MASQUERADE",
        "CONFIG_IP_NF_TARGET_REJECT",
        "CONFIG_IP6_NF_IPTABLES",
        "CONFIG_IP6_NF_FILTER",
        "CONFIG_IP6_NF_NAT",
        "CONFIG_IP6_NF_MANGLE",
        "CONFIG_IP6_NF_RAW",
        "CONFIG_IP6_NF_TARGET_MASQUERADE",
        "CONFIG_IP6_NF_TARGET_REJECT",
        // IPv6 and policy routing (TPROXY's fwmark rule).
        "CONFIG_IPV6",
        "CONFIG_IP_MULTIPLE_TABLES",
        "CONFIG_IPV6_MULTIPLE_TABLES",
        // Links.
        "CONFIG_BRIDGE",
        "CONFIG_BRIDGE_NETFILTER",
        "CONFIG_VETH",
        "CONFIG_TUN",
        "CONFIG_VLAN_8021Q",
        "CONFIG_MACVLAN",
        "CONFIG_IPVLAN",
        "CONFIG_PACKET",
        // FUSE inside the guest (/dev/fuse) and overlayfs (Docker-in-Docker's storage driver).
        "CONFIG_FUSE_FS",
        "CONFIG_OVERLAY_FS",
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|name| config.get(*name) != Some(&yes))
        .collect();
    assert!(
        missing.is_empty(),
        "{}: not =y: {}",
        path.display(),
        missing.join(", ")
    );
    // Still no modules: everything above is built in (no modprobe in the guest).
    assert_ne!(
        config.get("CONFIG_MODULES"),
        Some(&yes),
        "{}: CONFIG_MODULES must stay off",
        path.display()
    );
}

#[test]
fn every_fragment_option_group_has_a_reason() {
    let fragments = load_fragments().unwrap_or_else(|e| panic!("{e}"));
    let missing: Vec<String> = fragments
        .iter()
        .flat_map(|(name, text)| groups_without_reason(name, text))
        .collect();
    if !missing.is_empty() {
        panic!("{}", CheckError::MissingReason(missing));
    }
}

#[test]
fn fragments_parse_without_conflicts() {
    let mut requests = Vec::new();
    for (name, text) in load_fragments().unwrap_or_else(|e| panic!("{e}")) {
        requests.extend(parse_fragment(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    if let Err(e) = check_conflicts(&requests) {
        panic!("{e}");
    }
}

#[test]
fn dropped_options_are_reported_and_honoured_ones_are_not() {
    let fragment = "# reason\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n# CONFIG_D is not set\nCONFIG_E=64\n";
    let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\nCONFIG_E=32\n";
    let requests = parse_fragment("frag", fragment).unwrap_or_else(|e| panic!("{e}"));
    let report = dropped(&requests, &parse_config(config));
    assert_eq!(report.len(), 3, "{report:#?}");
    assert!(
        report[0].starts_with("CONFIG_B=y  [frag:3]"),
        "{}",
        report[0]
    );
    assert!(
        report[1].starts_with("CONFIG_C is not set  [frag:4]"),
        "{}",
        report[1]
    );
    assert!(
        report[2].contains("built config: CONFIG_E=32"),
        "{}",
        report[2]
    );
}

#[test]
fn absent_options_are_reported_as_dropped() {
    let requests = parse_fragment("frag", "CONFIG_VIRTIO_FS=y\n").unwrap_or_else(|e| panic!("{e}"));
    let report = dropped(&requests, &parse_config("CONFIG_FUSE_FS=y\n"));
    assert_eq!(report.len(), 1);
    assert!(report[0].contains("absent"), "{}", report[0]);
}

#[test]
fn malformed_fragment_lines_are_rejected() {
    assert!(matches!(
        parse_fragment("frag", "# ok\nVIRTIO_FS=y\n"),
        Err(CheckError::BadLine { ref origin, .. }) if origin == "frag:2"
    ));
    assert!(matches!(
        parse_fragment("frag", "CONFIG_X=\n"),
        Err(CheckError::BadLine { .. })
    ));
}

#[test]
fn conflicting_requests_are_rejected() {
    let requests = parse_fragment("frag", "CONFIG_A=y\n# CONFIG_A is not set\n")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(
        check_conflicts(&requests),
        Err(CheckError::Conflict { .. })
    ));
}

#[test]
fn groups_need_a_reason_comment() {
    let text = "# why\nCONFIG_A=y\nCONFIG_B=y\n\nCONFIG_C=y\n";
    assert_eq!(
        groups_without_reason("frag", text),
        vec!["frag:5: CONFIG_C=y".to_string()]
    );
}
