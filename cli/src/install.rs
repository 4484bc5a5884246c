//! `moat install`: puts moat's runtime into the containerd configuration that containerd runs
//! with (or takes it out again with `--uninstall`), and restarts containerd when asked. This
//! module owns the command's flow and what it tells the user; finding, editing and writing the
//! file are [`crate::containerd_config`]'s.
//!
//! ```text
//! moat install [--containerd-config PATH] [--runtime-name NAME] [--dry-run] [--uninstall] [--restart]
//! ```
//!
//! Safe to repeat: a second run finds its entry and changes nothing. A changed file is first
//! checked by the installed containerd (`containerd --config TMP config dump` must show the
//! runtime), then written atomically, its previous content kept in `<config>.moat-backup`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::containerd_config::{
    self as cc, ConfigLocation, ContainerdConfigError, Entry, FoundRuntime, InstallPlan,
    UninstallPlan, MARKER, RUNTIME_TYPE,
};

/// The command's synopsis.
pub const USAGE: &str = "moat install [--containerd-config PATH] [--runtime-name NAME] [--dry-run] [--uninstall] [--restart]";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The containerd config to edit; `None`: the one containerd runs with
    /// ([`cc::locate`]).
    pub containerd_config: Option<PathBuf>,
    /// The runtime's name (the Kubernetes RuntimeClass handler).
    pub runtime_name: String,
    /// Print the diff, write nothing.
    pub dry_run: bool,
    /// Remove what `moat install` added instead.
    pub uninstall: bool,
    /// Restart containerd after a change (`systemctl restart containerd`).
    pub restart: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            containerd_config: None,
            runtime_name: cc::DEFAULT_RUNTIME_NAME.to_owned(),
            dry_run: false,
            uninstall: false,
            restart: false,
        }
    }
}

/// Parses the arguments after `install`; the error is the message to print.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |what: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag {
            "--containerd-config" => o.containerd_config = Some(PathBuf::from(value("a path")?)),
            "--runtime-name" => o.runtime_name = value("a name")?,
            "--dry-run" => o.dry_run = true,
            "--uninstall" => o.uninstall = true,
            "--restart" => o.restart = true,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if !valid_handler(&o.runtime_name) {
        return Err(format!(
            "--runtime-name {:?}: a RuntimeClass handler is a DNS label (lowercase letters, digits and '-', at most 63, not starting or ending with '-')",
            o.runtime_name
        ));
    }
    Ok(o)
}

fn valid_handler(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Where the command looks and what it runs: the real host normally, a fabricated one in tests.
#[derive(Debug, Clone)]
pub struct Host {
    /// The `/proc` to find the running containerd in.
    pub proc: PathBuf,
    /// The containerd binary to ask (format, `config dump`); `None`: the running containerd's,
    /// else `containerd` on `PATH`.
    pub containerd: Option<PathBuf>,
    /// The command that restarts containerd.
    pub restart_command: Vec<String>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            proc: PathBuf::from("/proc"),
            containerd: None,
            restart_command: ["systemctl", "restart", "containerd"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// Why `moat install` did not finish.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Reading, parsing, editing or writing the config failed.
    #[error(transparent)]
    Config(#[from] ContainerdConfigError),
    /// The installed containerd does not accept the edited file.
    #[error("{path} is left as it was: {source}; add the runtime by hand (docs/operating.md)")]
    Rejected {
        /// The config.
        path: PathBuf,
        /// containerd's answer.
        #[source]
        source: ContainerdConfigError,
    },
    /// The installed containerd reads the edited file without the runtime in it.
    #[error("{path} is left as it was: with the edit, `{binary} config dump` shows runtime {name} as {found}, not of type {RUNTIME_TYPE}; add the runtime by hand (docs/operating.md)")]
    NotInDump {
        /// The config.
        path: PathBuf,
        /// The containerd binary.
        binary: PathBuf,
        /// The runtime name.
        name: String,
        /// What the dump showed instead.
        found: String,
    },
    /// The restart command could not be started.
    #[error("the config is written, but `{command}` could not run ({source}): restart containerd yourself")]
    RestartSpawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The restart command failed.
    #[error("the config is written, but `{command}` failed ({status}){stderr}: see `journalctl -u containerd`; `moat install --uninstall` takes moat's entry out again")]
    RestartFailed {
        /// The command.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its error output, if any (with a leading ": ").
        stderr: String,
    },
    /// Printing failed (a closed pipe).
    #[error("cannot print: {0}")]
    Output(#[source] std::io::Error),
}

/// Prints a line, or returns [`InstallError::Output`].
macro_rules! say {
    ($out:expr, $($fmt:tt)*) => {
        writeln!($out, $($fmt)*).map_err(InstallError::Output)?
    };
}

/// Runs `moat install` as `opts` says on `host`, telling `out` what it does.
pub fn run(opts: &Options, host: &Host, out: &mut dyn Write) -> Result<(), InstallError> {
    let location = cc::locate(&host.proc, opts.containerd_config.as_deref());
    let path = location.path.clone();
    say!(
        out,
        "containerd config: {} ({})",
        path.display(),
        location.reason()
    );
    if path != cc::write_target(&path) {
        say!(
            out,
            "  it is a link to {}, which is the file edited",
            cc::write_target(&path).display()
        );
    }
    let binary = host
        .containerd
        .clone()
        .or_else(|| cc::containerd_binary(&location));
    let old = cc::read_config(&path)?;
    let changed = if opts.uninstall {
        uninstall(opts, &path, old.as_deref(), out)?
    } else {
        install(opts, &path, old.as_deref(), binary.as_deref(), out)?
    };
    restart(opts, host, &location, changed, out)
}

fn where_found(path: &Path, f: &FoundRuntime) -> String {
    if f.file == path {
        path.display().to_string()
    } else {
        format!("{}, imported by {}", f.file.display(), path.display())
    }
}

/// Adds the runtime; true when the file changed (or would, in a dry run).
fn install(
    opts: &Options,
    path: &Path,
    old: Option<&str>,
    binary: Option<&Path>,
    out: &mut dyn Write,
) -> Result<bool, InstallError> {
    let name = &opts.runtime_name;
    let entry = Entry {
        name: name.clone(),
        ..Entry::default()
    };
    let mut ask = || match binary {
        Some(b) => cc::native_version(b, path),
        None => Err(ContainerdConfigError::NoContainerd {
            path: path.to_owned(),
        }),
    };
    let (new, format, added_version) = match cc::plan_install(path, old, &entry, &mut ask)? {
        InstallPlan::Present(f) => {
            let by = if f.added_by_moat {
                "added by moat install"
            } else {
                "not added by moat install: left as it is"
            };
            say!(
                out,
                "runtime {name} is already in {} ({by}): nothing to change",
                where_found(path, &f)
            );
            if f.runtime_type.as_deref() != Some(RUNTIME_TYPE) {
                say!(
                    out,
                    "note: its runtime_type is {}, not {RUNTIME_TYPE}: pods of RuntimeClass handler {name} do not run in moat (choose another --runtime-name, or fix it by hand)",
                    f.runtime_type.as_deref().unwrap_or("unset")
                );
            }
            return Ok(false);
        }
        InstallPlan::Change {
            new,
            format,
            added_version,
            ..
        } => (new, format, added_version),
    };
    // containerd 2.x also reads drop-ins it was not told about (/etc/containerd/conf.d): the
    // real containerd says whether the runtime is there already.
    if let (Some(b), Some(old)) = (binary, old) {
        if let Ok(dump) = cc::dump(b, old) {
            if let Some(t) = cc::dumped_runtime_type(&dump, name) {
                say!(
                    out,
                    "runtime {name} ({t}) is already in containerd's configuration ({} config dump), from a file {} does not import itself (containerd 2.x reads /etc/containerd/conf.d/*.toml): nothing to change",
                    b.display(),
                    path.display()
                );
                return Ok(false);
            }
        }
    }
    say!(
        out,
        "format: version {} ({}; runtimes under plugin {}){}",
        format.version,
        format.containerds(),
        format.plugin(),
        if added_version {
            if old.is_some() {
                " — the file has no version line; adding the one the installed containerd writes"
            } else {
                " — the version the installed containerd writes"
            }
        } else {
            ""
        }
    );
    // containerd 1.x reads a version 3 file without complaint but without its CRI runtimes.
    let older =
        binary.filter(|b| format.version >= 3 && cc::native_version(b, path).is_ok_and(|v| v == 2));
    match binary {
        Some(b) if older.is_some() => say!(
            out,
            "not checked: {} is a containerd 1.x, which does not read version {} files (containerd 2.x does)",
            b.display(),
            format.version
        ),
        Some(b) => match cc::dump(b, &new) {
            Ok(dump) => match cc::dumped_runtime_type(&dump, name) {
                Some(t) if t == RUNTIME_TYPE => say!(
                    out,
                    "checked: `{} config dump` of the edited file shows runtime {name} ({t})",
                    b.display()
                ),
                other => {
                    return Err(InstallError::NotInDump {
                        path: path.to_owned(),
                        binary: b.to_owned(),
                        name: name.clone(),
                        found: other.unwrap_or_else(|| "absent".to_owned()),
                    })
                }
            },
            Err(e) if old.is_some_and(|o| cc::dump(b, o).is_err()) => say!(
                out,
                "not checked: {} cannot read the current file either ({e}); is it the containerd this file is for?",
                b.display()
            ),
            Err(source) => {
                return Err(InstallError::Rejected {
                    path: path.to_owned(),
                    source,
                })
            }
        },
        None => say!(
            out,
            "not checked with containerd: no containerd binary found (none running, none on PATH)"
        ),
    }
    if opts.dry_run {
        out.write_all(cc::diff(path, old.unwrap_or_default(), &new).as_bytes())
            .map_err(InstallError::Output)?;
        say!(out, "dry run: nothing written");
        return Ok(true);
    }
    let backup = cc::write_config(path, old, Some(&new))?;
    say!(
        out,
        "added runtime {name} (runtime_type {RUNTIME_TYPE}) to {}{}",
        path.display(),
        match &backup {
            Some(b) => format!("; the previous content is in {}", b.display()),
            None => " (a new file)".to_owned(),
        }
    );
    if let Some(config_path) = &entry.config_path {
        if !Path::new(config_path).exists() {
            say!(
                out,
                "note: the runtime's ConfigPath {config_path} does not exist yet: moat pods fail until it does (scripts/install puts it there)"
            );
        }
    }
    if cc::scan(path, &new).is_ok_and(|s| s.cri_disabled) {
        say!(
            out,
            "note: this config disables the CRI plugin (disabled_plugins): Kubernetes can use no runtime until it is enabled; ctr works"
        );
    }
    Ok(true)
}

/// Removes what `moat install` added; true when the file changed (or would).
fn uninstall(
    opts: &Options,
    path: &Path,
    old: Option<&str>,
    out: &mut dyn Write,
) -> Result<bool, InstallError> {
    let name = &opts.runtime_name;
    match cc::plan_uninstall(path, old, name)? {
        UninstallPlan::Absent => {
            let imported = old
                .and_then(|o| cc::scan(path, o).ok())
                .and_then(|s| s.runtimes.into_iter().find(|r| &r.name == name));
            match (old, imported) {
                (None, _) => say!(out, "{} does not exist: nothing to remove", path.display()),
                (_, Some(f)) => say!(
                    out,
                    "runtime {name} is in {}, which moat install does not edit: left as it is",
                    where_found(path, &f)
                ),
                _ => say!(
                    out,
                    "no runtime {name} in {}: nothing to remove",
                    path.display()
                ),
            }
            Ok(false)
        }
        UninstallPlan::NotOurs(f) => {
            say!(
                out,
                "runtime {name} in {} was not added by moat install (its table has no `# {MARKER}` comment): left as it is; remove it by hand if it should go",
                where_found(path, &f)
            );
            Ok(false)
        }
        UninstallPlan::Change { old, new } => {
            if opts.dry_run {
                out.write_all(cc::diff(path, &old, new.as_deref().unwrap_or_default()).as_bytes())
                    .map_err(InstallError::Output)?;
                if new.is_none() {
                    say!(
                        out,
                        "{} was written by moat install and would be removed",
                        path.display()
                    );
                }
                say!(out, "dry run: nothing written");
                return Ok(true);
            }
            let backup = cc::write_config(path, Some(&old), new.as_deref())?;
            let backup = backup
                .map(|b| format!("; the previous content is in {}", b.display()))
                .unwrap_or_default();
            if new.is_some() {
                say!(
                    out,
                    "removed runtime {name} (added by moat install) from {}{backup}",
                    path.display()
                );
            } else {
                say!(
                    out,
                    "removed {} (moat install had created it, and nothing else was added){backup}",
                    path.display()
                );
            }
            Ok(true)
        }
    }
}

/// Restarts containerd when asked and needed, else says whether it must be restarted.
fn restart(
    opts: &Options,
    host: &Host,
    location: &ConfigLocation,
    changed: bool,
    out: &mut dyn Write,
) -> Result<(), InstallError> {
    let running = location.containerd.as_ref();
    // A containerd that started before the file's last change has not read it.
    let stale = running
        .and_then(|c| cc::started_before_change(&host.proc, c.pid, &location.path))
        .unwrap_or(false);
    let command = host.restart_command.join(" ");
    if opts.dry_run {
        if changed || stale {
            say!(
                out,
                "then containerd must be restarted ({command}; or moat install --restart)"
            );
        }
        return Ok(());
    }
    if !changed && !stale {
        if let Some(c) = running {
            say!(
                out,
                "containerd (pid {}) has read the file as it is: no restart needed",
                c.pid
            );
        }
        return Ok(());
    }
    if stale && !changed {
        say!(
            out,
            "containerd (pid {}) started before {} last changed: it has not read it yet",
            running.map_or(0, |c| c.pid),
            location.path.display()
        );
    }
    if !opts.restart {
        say!(
            out,
            "restart containerd to load it: {command} (or run moat install --restart); running pods keep running"
        );
        return Ok(());
    }
    let Some((program, args)) = host.restart_command.split_first() else {
        return Ok(());
    };
    let result = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| InstallError::RestartSpawn {
            command: command.clone(),
            source,
        })?;
    if !result.status.success() {
        let stderr = String::from_utf8_lossy(&result.stderr).trim().to_owned();
        return Err(InstallError::RestartFailed {
            command,
            status: result.status,
            stderr: if stderr.is_empty() {
                stderr
            } else {
                format!(": {stderr}")
            },
        });
    }
    say!(out, "restarted containerd ({command})");
    Ok(())
}

#[cfg(test)]
mod tests;
