//! containerd's configuration file as moat sees it. This module owns:
//!
//! - **discovery** ([`locate`]): which file the running containerd reads (the `--config`/`-c`
//!   of the `containerd` process found in `/proc`, else containerd's default
//!   [`DEFAULT_PATH`]), shared by `moat install` and `moat check`;
//! - the **format** ([`Format`]): `version = 2` (containerd 1.6/1.7, CRI plugin
//!   `io.containerd.grpc.v1.cri`) or `version = 3`/`4` (containerd 2.x, runtime settings in
//!   `io.containerd.cri.v1.runtime`); for a file without one, what the installed containerd
//!   writes itself ([`native_version`]);
//! - **finding** a runtime in the file or in one of its `imports` ([`scan`]);
//! - **adding and removing** moat's runtime entry ([`plan_install`], [`plan_uninstall`]) with
//!   `toml_edit`, so every other byte of the file (comments, order, quoting, indentation) stays
//!   as it was. What moat adds carries the comment [`MARKER`]; only such an entry is removed;
//! - **writing** atomically with a backup ([`write_config`]) and asking a real containerd to read
//!   a text back ([`dump`]).
//!
//! Everything that reads the host takes its root (`/proc`, the config path, the containerd
//! binary) as an argument, so it is tested against fabricated trees and real containerds.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use toml_edit::{DocumentMut, Item, Table, TableLike, Value};

use crate::procfs;

/// containerd's own default config path (used when containerd runs without `--config`).
pub const DEFAULT_PATH: &str = "/etc/containerd/config.toml";
/// The runtime type (shim name) of moat's runtime entry.
pub const RUNTIME_TYPE: &str = "io.containerd.moat.v2";
/// The runtime name `moat install` uses unless told otherwise (the Kubernetes RuntimeClass
/// handler).
pub const DEFAULT_RUNTIME_NAME: &str = "moat";
/// The comment that marks what `moat install` added; `--uninstall` removes only what has it.
pub const MARKER: &str = "added by moat install";
/// Appended to the config path for the copy of its previous content.
pub const BACKUP_SUFFIX: &str = ".moat-backup";
/// The CRI plugin of config version 2 (containerd 1.x).
pub const CRI_PLUGIN_V2: &str = "io.containerd.grpc.v1.cri";
/// The CRI runtime plugin of config versions 3 and 4 (containerd 2.x).
pub const CRI_RUNTIME_PLUGIN_V3: &str = "io.containerd.cri.v1.runtime";
/// First line of a config file `moat install` created (there was none).
const CREATED_HEADER: &str =
    "# containerd configuration written by moat install (there was none); `moat install --uninstall` removes it";

/// Everything that can go wrong reading, editing or writing containerd's config.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read containerd config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("containerd config {path} is not valid TOML (containerd cannot read it either; fix it first): {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        #[source]
        source: Box<toml_edit::TomlError>,
    },
    /// A `version` moat does not edit.
    #[error("containerd config {path} has version = {version}: moat install edits version 2 (containerd 1.6/1.7) and versions 3 and 4 (containerd 2.x){hint}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version as written.
        version: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// No `version` but plugin settings: containerd reads such a file as version 1.
    #[error("containerd config {path} has plugin settings but no `version` line, so containerd reads it as version 1, which moat install does not edit: convert it to version 2 (containerd 2.x: `containerd config migrate`; 1.x: add `version = 2` and name the plugins by their full ids, e.g. plugins.\"io.containerd.grpc.v1.cri\") or add the runtime by hand (docs/operating.md)")]
    VersionOne {
        /// The file.
        path: PathBuf,
    },
    /// Something on the way to the runtime table is a value, not a table.
    #[error("containerd config {path}: `{key}` is {found}, not a [table], so moat install cannot add the runtime under it: add it by hand (docs/operating.md)")]
    NotATable {
        /// The file.
        path: PathBuf,
        /// The dotted key.
        key: String,
        /// What is there instead.
        found: &'static str,
    },
    /// The installed containerd could not be asked for its config version.
    #[error("{path} has no `version` and asking {binary} which version it writes failed ({source}): put `version = 2` (containerd 1.x) or `version = 3` (containerd 2.x) in {path} first")]
    RunContainerd {
        /// The file that needs a version.
        path: PathBuf,
        /// The containerd binary.
        binary: PathBuf,
        /// Why it could not run.
        #[source]
        source: std::io::Error,
    },
    /// The installed containerd answered something moat does not know.
    #[error("{path} has no `version` and {binary} does not tell a config version moat knows ({answer:?}): put `version = 2` (containerd 1.x) or `version = 3` (containerd 2.x) in {path} first")]
    UnknownContainerd {
        /// The file that needs a version.
        path: PathBuf,
        /// The containerd binary.
        binary: PathBuf,
        /// What it said.
        answer: String,
    },
    /// No containerd binary to ask, and the file has no version.
    #[error("{path} has no `version` and no containerd binary was found to ask which version it writes: install containerd, or put `version = 2` (containerd 1.x) or `version = 3` (containerd 2.x) in {path}")]
    NoContainerd {
        /// The file that needs a version.
        path: PathBuf,
    },
    /// Writing the file, its backup or its temporary copy failed.
    #[error("cannot {what} {path}: {source}")]
    Write {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `containerd config dump` failed on a config.
    #[error("`{binary} config dump` fails on it: {stderr}")]
    Rejected {
        /// The containerd binary.
        binary: PathBuf,
        /// containerd's complaint.
        stderr: String,
    },
    /// `containerd config dump` printed something that is not TOML.
    #[error("{binary} config dump printed no TOML: {source}")]
    DumpParse {
        /// The containerd binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
}

type Result<T> = std::result::Result<T, ContainerdConfigError>;

// ---------------------------------------------------------------------------------------------
// Discovery

/// A running containerd daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningContainerd {
    /// Its pid.
    pub pid: u32,
    /// Its binary: the path `/proc/PID/exe` names when that file is here, else `/proc/PID/exe`
    /// itself when it can be opened; `None` otherwise.
    pub exe: Option<PathBuf>,
    /// Its `--config`, made absolute against its working directory; `None` when it runs
    /// without one (containerd then reads [`DEFAULT_PATH`]).
    pub config: Option<PathBuf>,
}

/// Which containerd config file to use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLocation {
    /// The file.
    pub path: PathBuf,
    /// The running containerd, if one was found.
    pub containerd: Option<RunningContainerd>,
    /// The path was given by the user (`--containerd-config`).
    pub explicit: bool,
}

impl ConfigLocation {
    /// Why this file, for messages: "the --config of containerd (pid 812)" etc.
    pub fn reason(&self) -> String {
        match (&self.containerd, self.explicit) {
            (_, true) => "given with --containerd-config".to_owned(),
            (Some(c), false) if c.config.is_some() => {
                format!("the --config of the running containerd, pid {}", c.pid)
            }
            (Some(c), false) => format!(
                "containerd's default; the running containerd (pid {}) has no --config",
                c.pid
            ),
            (None, false) => "containerd's default; no running containerd found".to_owned(),
        }
    }
}

/// The `--config` of a containerd daemon command line (`args` without argv\[0\]): `Some(None)`
/// for a daemon without one, `None` when the command line is not the daemon's (a subcommand
/// such as `config dump`, or `--version`).
pub fn daemon_config_flag(args: &[String]) -> Option<Option<String>> {
    // containerd's global flags that take a value (urfave/cli: `-c X`, `-c=X`, `--config X`…).
    const WITH_VALUE: &[&str] = &["log-level", "l", "address", "a", "root", "state"];
    let mut config = None;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(flag) = arg.strip_prefix('-') else {
            return None; // a subcommand: not the daemon
        };
        let flag = flag.strip_prefix('-').unwrap_or(flag);
        if flag.is_empty() {
            break;
        }
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        match name {
            "config" | "c" => {
                config = inline.or_else(|| {
                    i += 1;
                    args.get(i - 1).cloned()
                });
            }
            "version" | "v" | "help" | "h" => return None,
            n if WITH_VALUE.contains(&n) && inline.is_none() => i += 1,
            _ => {}
        }
    }
    Some(config)
}

/// The running containerd daemon of the `proc` tree: a process whose argv\[0\] is named
/// `containerd` and whose arguments are the daemon's (see [`daemon_config_flag`]). With several,
/// the one whose parent is pid 1 (a system service) wins, then the lowest pid.
pub fn find_running_containerd(proc: &Path) -> Option<RunningContainerd> {
    let mut found: Vec<(bool, RunningContainerd)> = Vec::new();
    for pid in procfs::pids(proc) {
        let Some(argv) = procfs::cmdline(proc, pid) else {
            continue;
        };
        let Some(argv0) = argv.first() else { continue };
        if Path::new(argv0).file_name().and_then(|n| n.to_str()) != Some("containerd") {
            continue;
        }
        let Some(flag) = daemon_config_flag(&argv[1..]) else {
            continue;
        };
        let dir = proc.join(pid.to_string());
        let config = flag.map(|c| {
            let c = PathBuf::from(c);
            match fs::read_link(dir.join("cwd")) {
                Ok(cwd) if c.is_relative() => cwd.join(c),
                _ => c,
            }
        });
        // Its path when this mount namespace has it; else the process's own link to its
        // binary (a container with the host's pids but not its files can still run it).
        let exe = fs::read_link(dir.join("exe"))
            .ok()
            .map(|e| {
                let s = e.to_string_lossy();
                PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
            })
            .filter(|e| e.is_file())
            .or_else(|| Some(dir.join("exe")).filter(|e| e.is_file()));
        let service = procfs::ppid(proc, pid) == Some(1);
        found.push((service, RunningContainerd { pid, exe, config }));
    }
    // Stable: pids are ascending, so the first service (or else the first one) wins.
    found.sort_by_key(|(service, _)| !service);
    found.into_iter().next().map(|(_, c)| c)
}

/// The containerd config to use: `explicit` if given, else the running containerd's
/// `--config`, else [`DEFAULT_PATH`].
pub fn locate(proc: &Path, explicit: Option<&Path>) -> ConfigLocation {
    let containerd = find_running_containerd(proc);
    let (path, explicit) = match explicit {
        Some(p) => (p.to_owned(), true),
        None => (
            containerd
                .as_ref()
                .and_then(|c| c.config.clone())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
            false,
        ),
    };
    ConfigLocation {
        path,
        containerd,
        explicit,
    }
}

/// The containerd binary to ask about formats: the running daemon's, else `containerd` on
/// `PATH`.
pub fn containerd_binary(location: &ConfigLocation) -> Option<PathBuf> {
    location
        .containerd
        .as_ref()
        .and_then(|c| c.exe.clone())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("containerd"))
                    .find(|p| p.is_file())
            })
        })
}

/// True when the running containerd started before `path` last changed (by more than the
/// second that `/proc` start times are precise to): it has not read the file as it is now.
/// `None` when either time is unknown.
pub fn started_before_change(proc: &Path, pid: u32, path: &Path) -> Option<bool> {
    let started = procfs::start_time(proc, pid)?;
    let changed = fs::metadata(path).ok()?.modified().ok()?;
    Some(started + Duration::from_secs(1) < changed)
}

// ---------------------------------------------------------------------------------------------
// Format

/// A config format moat edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// The file's `version`: 2, 3 or 4.
    pub version: i64,
}

impl Format {
    /// The plugin whose `containerd.runtimes` table holds the CRI runtimes.
    pub fn plugin(self) -> &'static str {
        if self.version == 2 {
            CRI_PLUGIN_V2
        } else {
            CRI_RUNTIME_PLUGIN_V3
        }
    }

    /// The containerd releases that write this format.
    pub fn containerds(self) -> &'static str {
        if self.version == 2 {
            "containerd 1.6/1.7"
        } else {
            "containerd 2.x"
        }
    }

    /// containerd 2.x writes strings in single quotes; follow the file's style.
    fn quote(self) -> char {
        if self.version == 2 {
            '"'
        } else {
            '\''
        }
    }

    fn from_version(path: &Path, version: &Item) -> Result<Self> {
        let unsupported = |hint| ContainerdConfigError::UnsupportedVersion {
            path: path.to_owned(),
            version: version.to_string().trim().to_owned(),
            hint,
        };
        match version.as_integer() {
            Some(v @ 2..=4) => Ok(Format { version: v }),
            Some(1) => Err(unsupported(
                ": convert it to version 2 (containerd 2.x: `containerd config migrate`), or add the runtime by hand (docs/operating.md)",
            )),
            _ => Err(unsupported(
                ": is this containerd newer than moat? add the runtime by hand (docs/operating.md)",
            )),
        }
    }
}

/// The config version `binary` writes itself: the `version` of its `config default`, else from
/// `--version` (1.x: 2, 2.x: 3).
pub fn native_version(binary: &Path, path: &Path) -> Result<i64> {
    let run = |args: &[&str]| {
        Command::new(binary).args(args).output().map_err(|source| {
            ContainerdConfigError::RunContainerd {
                path: path.to_owned(),
                binary: binary.to_owned(),
                source,
            }
        })
    };
    let default = run(&["config", "default"])?;
    if default.status.success() {
        if let Ok(t) = String::from_utf8_lossy(&default.stdout).parse::<toml::Table>() {
            if let Some(v @ 2..=4) = t.get("version").and_then(toml::Value::as_integer) {
                return Ok(v);
            }
        }
    }
    let out = run(&["--version"])?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let major = answer
        .split_whitespace()
        .nth(2)
        .map(|v| v.trim_start_matches('v'))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(1) => Ok(2),
        Some(2) => Ok(3),
        _ => Err(ContainerdConfigError::UnknownContainerd {
            path: path.to_owned(),
            binary: binary.to_owned(),
            answer,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Finding runtimes

/// A runtime entry found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundRuntime {
    /// The file it is in (the config or one of its imports).
    pub file: PathBuf,
    /// The plugin it is under.
    pub plugin: &'static str,
    /// Its name (the CRI handler).
    pub name: String,
    /// Its `runtime_type`, if set.
    pub runtime_type: Option<String>,
    /// It carries [`MARKER`].
    pub added_by_moat: bool,
}

/// What a config file (and its imports) holds, for `moat check` and `moat install`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scan {
    /// The file's `version`, if it has one.
    pub version: Option<i64>,
    /// The runtimes of the file and of its imports, file first.
    pub runtimes: Vec<FoundRuntime>,
    /// The files the `imports` name (globs expanded).
    pub imports: Vec<PathBuf>,
    /// Imports that could not be read or parsed, with why.
    pub bad_imports: Vec<(PathBuf, String)>,
    /// The CRI plugin is in `disabled_plugins`.
    pub cri_disabled: bool,
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut> {
    text.parse::<DocumentMut>()
        .map_err(|source| ContainerdConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
}

fn lookup<'a>(root: &'a dyn TableLike, path: &[&str]) -> Option<&'a dyn TableLike> {
    let mut t = root;
    for key in path {
        t = t.get(key)?.as_table_like()?;
    }
    Some(t)
}

fn runtimes_path(plugin: &str) -> [&str; 4] {
    ["plugins", plugin, "containerd", "runtimes"]
}

fn is_marked(item: &Item) -> bool {
    item.as_table()
        .and_then(|t| t.decor().prefix())
        .and_then(|p| p.as_str())
        .is_some_and(|p| p.contains(MARKER))
}

fn runtimes_in(file: &Path, doc: &DocumentMut, plugins: &[&'static str]) -> Vec<FoundRuntime> {
    let mut out = Vec::new();
    for plugin in plugins {
        let Some(runtimes) = lookup(doc.as_table(), &runtimes_path(plugin)) else {
            continue;
        };
        for (name, item) in runtimes.iter() {
            let runtime_type = item
                .as_table_like()
                .and_then(|t| t.get("runtime_type"))
                .and_then(Item::as_str)
                .map(str::to_owned);
            out.push(FoundRuntime {
                file: file.to_owned(),
                plugin,
                name: name.to_owned(),
                runtime_type,
                added_by_moat: is_marked(item),
            });
        }
    }
    out
}

/// `*` and `?` in one path component.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], name) || (!name.is_empty() && glob_match(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The files `imports` names, relative ones against the config's directory; wildcards (`*`,
/// `?`) are expanded in the last component, like containerd's glob.
pub fn import_paths(config: &Path, doc: &DocumentMut) -> Vec<PathBuf> {
    let base = config.parent().unwrap_or(Path::new("/"));
    let Some(list) = doc.get("imports").and_then(Item::as_array) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in list.iter().filter_map(Value::as_str) {
        let p = base.join(entry);
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        match (name, p.parent()) {
            (Some(name), Some(dir)) if name.contains(['*', '?']) => {
                let mut matched: Vec<PathBuf> = fs::read_dir(dir)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter(|e| {
                                glob_match(name.as_bytes(), e.file_name().as_encoded_bytes())
                            })
                            .map(|e| e.path())
                            .collect()
                    })
                    .unwrap_or_default();
                matched.sort();
                out.extend(matched);
            }
            _ => out.push(p),
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    out
}

/// Reads what the config at `path` (text `text`) and its imports define. Imports are searched
/// under both CRI plugins (each import may have its own version); a missing import is left out,
/// as containerd does.
pub fn scan(path: &Path, text: &str) -> Result<Scan> {
    let doc = parse(path, text)?;
    let version = doc.get("version").and_then(Item::as_integer);
    let main_plugins: &[&'static str] = match version {
        Some(2) => &[CRI_PLUGIN_V2],
        Some(3 | 4) => &[CRI_RUNTIME_PLUGIN_V3],
        _ => &[CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3],
    };
    let mut scan = Scan {
        version,
        runtimes: runtimes_in(path, &doc, main_plugins),
        imports: import_paths(path, &doc),
        ..Scan::default()
    };
    scan.cri_disabled = doc
        .get("disabled_plugins")
        .and_then(Item::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|p| p == "cri" || p == CRI_PLUGIN_V2)
        });
    for import in scan.imports.clone() {
        match fs::read_to_string(&import) {
            Ok(t) => match parse(&import, &t) {
                Ok(d) => scan.runtimes.extend(runtimes_in(
                    &import,
                    &d,
                    &[CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3],
                )),
                Err(e) => scan.bad_imports.push((import, e.to_string())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => scan.bad_imports.push((import, e.to_string())),
        }
    }
    Ok(scan)
}

// ---------------------------------------------------------------------------------------------
// Editing

/// What `moat install` finds or will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallPlan {
    /// The runtime is there already; nothing changes.
    Present(FoundRuntime),
    /// The file changes from `old` (`None`: it does not exist) to `new`.
    Change {
        /// The content now.
        old: Option<String>,
        /// The content to write.
        new: String,
        /// The format written.
        format: Format,
        /// A `version` line was added (the file had none).
        added_version: bool,
    },
}

/// The settings of the entry `moat install` adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The runtime name (the Kubernetes RuntimeClass handler).
    pub name: String,
    /// The `ConfigPath` option (the moat config the shim reads), if any.
    pub config_path: Option<String>,
}

impl Default for Entry {
    fn default() -> Self {
        Entry {
            name: DEFAULT_RUNTIME_NAME.to_owned(),
            config_path: Some(moat_shim::config::DEFAULT_CONFIG_PATH.to_owned()),
        }
    }
}

fn kind_of(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(Value::InlineTable(_)) => "an inline table",
        Item::Value(Value::Array(_)) => "an array",
        Item::Value(_) => "a value",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

/// The table at `path` below `root`, made (implicit, so without a header of its own) where
/// missing.
fn table_at<'a>(root: &'a mut Table, path: &[&str], file: &Path) -> Result<&'a mut Table> {
    let mut t = root;
    for (i, key) in path.iter().enumerate() {
        let item = t.entry(key).or_insert_with(|| {
            let mut new = Table::new();
            new.set_implicit(true);
            Item::Table(new)
        });
        t = match item {
            Item::Table(table) => table,
            other => {
                return Err(ContainerdConfigError::NotATable {
                    path: file.to_owned(),
                    key: path[..=i].join("."),
                    found: kind_of(other),
                })
            }
        };
    }
    Ok(t)
}

/// The indentation of a table header (the last line of its prefix), if it has one.
fn header_indent(t: &Table) -> Option<String> {
    let prefix = t.decor().prefix()?.as_str()?;
    let last = prefix.rsplit('\n').next().unwrap_or(prefix);
    last.chars()
        .all(|c| c == ' ' || c == '\t')
        .then(|| last.to_owned())
}

/// Whether the file indents nested table headers (containerd's `config default` does).
fn indents_headers(t: &Table) -> bool {
    t.iter().any(|(_, item)| {
        item.as_table().is_some_and(|sub| {
            header_indent(sub).is_some_and(|i| !i.is_empty()) || indents_headers(sub)
        })
    })
}

fn quoted(format: Format, s: &str) -> Item {
    let q = format.quote();
    let text = if q == '\'' && !s.contains('\'') && !s.contains('\n') {
        format!("'{s}'")
    } else {
        Value::from(s).to_string()
    };
    match text.trim().parse::<Value>() {
        Ok(v) => Item::Value(v),
        Err(_) => Item::Value(Value::from(s)),
    }
}

/// The runtime table moat adds, indented by `indent`.
fn runtime_table(format: Format, entry: &Entry, indent: &str) -> Table {
    let mut t = Table::new();
    t.decor_mut().set_prefix(format!(
        "\n{indent}# {MARKER} (`moat install --uninstall` removes it)\n{indent}"
    ));
    t.insert("runtime_type", quoted(format, RUNTIME_TYPE));
    if let Some(mut k) = t.key_mut("runtime_type") {
        k.leaf_decor_mut().set_prefix(format!("{indent}  "));
    }
    if let Some(config_path) = &entry.config_path {
        let mut options = Table::new();
        options.decor_mut().set_prefix(format!("{indent}  "));
        options.insert("ConfigPath", quoted(format, config_path));
        if let Some(mut k) = options.key_mut("ConfigPath") {
            k.leaf_decor_mut().set_prefix(format!("{indent}    "));
        }
        t.insert("options", Item::Table(options));
    }
    t
}

/// Plans `moat install` on the config at `path` whose content is `old` (`None`: no such file):
/// the runtime `entry.name` under the CRI plugin of the file's format, unless the file or one of
/// its imports has a runtime of that name already. `native_version` is asked for the format
/// when the file has no `version` (see [`native_version`]).
pub fn plan_install(
    path: &Path,
    old: Option<&str>,
    entry: &Entry,
    native_version: &mut dyn FnMut() -> Result<i64>,
) -> Result<InstallPlan> {
    let created = old.is_none();
    let (mut doc, format, added_version) = match old {
        None => {
            let version = native_version()?;
            let format = Format::from_version(path, &toml_edit::value(version))?;
            let skeleton = format!("{CREATED_HEADER}\nversion = {version}\n");
            (parse(path, &skeleton)?, format, true)
        }
        Some(text) => {
            let mut doc = parse(path, text)?;
            match doc.get("version") {
                Some(v) => {
                    let format = Format::from_version(path, v)?;
                    (doc, format, false)
                }
                None if doc.contains_key("plugins") => {
                    return Err(ContainerdConfigError::VersionOne {
                        path: path.to_owned(),
                    })
                }
                None => {
                    let version = native_version()?;
                    let format = Format::from_version(path, &toml_edit::value(version))?;
                    let mut item = toml_edit::value(version);
                    if let Some(v) = item.as_value_mut() {
                        v.decor_mut().set_suffix(format!(" # {MARKER}"));
                    }
                    doc.insert("version", item);
                    (doc, format, true)
                }
            }
        }
    };
    let plugin = format.plugin();
    if !created {
        let found = scan(path, old.unwrap_or_default())?;
        if let Some(f) = found.runtimes.into_iter().find(|r| r.name == entry.name) {
            return Ok(InstallPlan::Present(f));
        }
    }
    let indent_all = indents_headers(doc.as_table());
    let runtimes = table_at(doc.as_table_mut(), &runtimes_path(plugin), path)?;
    let indent = runtimes
        .iter()
        .find_map(|(_, item)| item.as_table().and_then(header_indent))
        .unwrap_or_else(|| {
            if indent_all {
                " ".repeat(2 * runtimes_path(plugin).len())
            } else {
                String::new()
            }
        });
    runtimes.insert(
        &entry.name,
        Item::Table(runtime_table(format, entry, &indent)),
    );
    let new = doc.to_string();
    // What was written must read back (a guard against an edit toml_edit renders oddly).
    parse(path, &new)?;
    Ok(InstallPlan::Change {
        old: old.map(str::to_owned),
        new,
        format,
        added_version,
    })
}

/// What `moat install --uninstall` finds or will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UninstallPlan {
    /// No runtime of that name in the file (or no file).
    Absent,
    /// A runtime of that name that moat did not add (no [`MARKER`]): left alone.
    NotOurs(FoundRuntime),
    /// The file changes from `old` to `new` (`None`: moat created the file; it is removed).
    Change {
        /// The content now.
        old: String,
        /// The content to write, or `None` to remove the file.
        new: Option<String>,
    },
}

/// Plans `moat install --uninstall`: removes the runtime `name` if it carries [`MARKER`], and a
/// `version` line moat added; a file moat created and nothing else changed is removed whole.
pub fn plan_uninstall(path: &Path, old: Option<&str>, name: &str) -> Result<UninstallPlan> {
    let Some(old) = old else {
        return Ok(UninstallPlan::Absent);
    };
    let mut doc = parse(path, old)?;
    let found = runtimes_in(path, &doc, &[CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3]);
    let ours: Vec<&FoundRuntime> = found
        .iter()
        .filter(|r| r.name == name && r.added_by_moat)
        .collect();
    if ours.is_empty() {
        return Ok(match found.into_iter().find(|r| r.name == name) {
            Some(r) => UninstallPlan::NotOurs(r),
            None => UninstallPlan::Absent,
        });
    }
    for r in &ours {
        let runtimes = doc
            .as_table_mut()
            .get_mut("plugins")
            .and_then(|p| p.get_mut(r.plugin))
            .and_then(|p| p.get_mut("containerd"))
            .and_then(|c| c.get_mut("runtimes"))
            .and_then(Item::as_table_like_mut);
        if let Some(runtimes) = runtimes {
            runtimes.remove(name);
        }
    }
    let version_ours = doc
        .get("version")
        .and_then(Item::as_value)
        .and_then(|v| v.decor().suffix())
        .and_then(|s| s.as_str())
        .is_some_and(|s| s.contains(MARKER));
    if version_ours {
        doc.remove("version");
    }
    // A file moat wrote from nothing, with nothing added since: remove it.
    let new = doc.to_string();
    let created = doc
        .get("version")
        .and_then(Item::as_integer)
        .map(|v| format!("{CREATED_HEADER}\nversion = {v}\n"));
    let new = (created.as_deref() != Some(new.as_str())).then_some(new);
    Ok(UninstallPlan::Change {
        old: old.to_owned(),
        new,
    })
}

/// A unified diff from `old` to `new` (3 lines of context), headed with `path`.
pub fn diff(path: &Path, old: &str, new: &str) -> String {
    let p = path.display().to_string();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{p} (now)"), &format!("{p} (new)"))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Writing and reading back

/// Where a file is really written: a symlinked config is edited at its target (the link stays).
pub fn write_target(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
        }
        _ => path.to_owned(),
    }
}

/// The backup file of a config path.
pub fn backup_path(path: &Path) -> PathBuf {
    let mut s = write_target(path).into_os_string();
    s.push(BACKUP_SUFFIX);
    PathBuf::from(s)
}

/// Writes `text` to `path` atomically: a temporary file in the same directory, with the mode
/// and owner of the file it replaces (0644 root for a new one), flushed to disk, renamed over
/// `path`, and the directory flushed.
fn write_atomic(path: &Path, text: &str, like: Option<&fs::Metadata>) -> Result<()> {
    let err = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| ContainerdConfigError::Write {
            what,
            path: p,
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(err("create the directory of", path))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(
        ".{}.moat-tmp.{}",
        name.as_deref().unwrap_or("config"),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(err("create", &tmp))?;
        f.write_all(text.as_bytes()).map_err(err("write", &tmp))?;
        let mode = like.map_or(0o644, |m| m.permissions().mode() & 0o7777);
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(err("set the mode of", &tmp))?;
        if let Some(m) = like {
            // Keep the owner; only root can change it, and then it matters.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.sync_all().map_err(err("flush", &tmp))?;
        fs::rename(&tmp, path).map_err(err("rename the new file onto", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Replaces the config at `path` (content `old`) by `new` (`None`: removes it), keeping `old` in
/// [`backup_path`]. Returns the backup's path when one was written.
pub fn write_config(path: &Path, old: Option<&str>, new: Option<&str>) -> Result<Option<PathBuf>> {
    let target = write_target(path);
    let meta = fs::metadata(&target).ok();
    let backup = match old {
        Some(old) => {
            let b = backup_path(path);
            write_atomic(&b, old, meta.as_ref())?;
            Some(b)
        }
        None => None,
    };
    match new {
        Some(new) => write_atomic(&target, new, meta.as_ref())?,
        None => fs::remove_file(&target).map_err(|source| ContainerdConfigError::Write {
            what: "remove",
            path: target.clone(),
            source,
        })?,
    }
    Ok(backup)
}

/// Reads the config at `path`: `None` when there is no such file.
pub fn read_config(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ContainerdConfigError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Has the real containerd `binary` read `text` as a config (`containerd --config FILE config
/// dump`, from a temporary file, so relative `imports` are not followed) and returns the
/// configuration it would run with.
pub fn dump(binary: &Path, text: &str) -> Result<toml::Table> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let tmp = std::env::temp_dir().join(format!(
        "moat-containerd-config-{}-{}.toml",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    fs::write(&tmp, text).map_err(|source| ContainerdConfigError::Write {
        what: "write",
        path: tmp.clone(),
        source,
    })?;
    let result = dump_file(binary, &tmp);
    let _ = fs::remove_file(&tmp);
    result
}

/// Has the real containerd `binary` read the config file `path` (`containerd --config PATH
/// config dump`) and returns the configuration it would run with.
pub fn dump_file(binary: &Path, path: &Path) -> Result<toml::Table> {
    let out = Command::new(binary)
        .arg("--config")
        .arg(path)
        .args(["config", "dump"])
        .output()
        .map_err(|source| ContainerdConfigError::Rejected {
            binary: binary.to_owned(),
            stderr: format!("cannot run it: {source}"),
        })?;
    if !out.status.success() {
        return Err(ContainerdConfigError::Rejected {
            binary: binary.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    String::from_utf8_lossy(&out.stdout)
        .parse::<toml::Table>()
        .map_err(|source| ContainerdConfigError::DumpParse {
            binary: binary.to_owned(),
            source: Box::new(source),
        })
}

/// Every runtime of a `config dump` (either CRI plugin): `(name, runtime_type)`.
pub fn dumped_runtimes(dump: &toml::Table) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for plugin in [CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3] {
        let runtimes = dump
            .get("plugins")
            .and_then(|p| p.get(plugin))
            .and_then(|p| p.get("containerd"))
            .and_then(|c| c.get("runtimes"))
            .and_then(toml::Value::as_table);
        for (name, r) in runtimes.into_iter().flatten() {
            let t = r.get("runtime_type").and_then(toml::Value::as_str);
            out.push((name.clone(), t.unwrap_or_default().to_owned()));
        }
    }
    out
}

/// The `runtime_type` of runtime `name` in a `config dump` (either CRI plugin), if it is there.
pub fn dumped_runtime_type(dump: &toml::Table, name: &str) -> Option<String> {
    [CRI_PLUGIN_V2, CRI_RUNTIME_PLUGIN_V3]
        .iter()
        .find_map(|plugin| {
            dump.get("plugins")?
                .get(plugin)?
                .get("containerd")?
                .get("runtimes")?
                .get(name)?
                .get("runtime_type")?
                .as_str()
                .map(str::to_owned)
        })
}

#[cfg(test)]
mod tests;
