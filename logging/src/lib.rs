//! moat's structured logging: the one place where moat-vmm, moat-agent and the shim set up
//! [`tracing`], so their lines look alike and carry the same context.
//!
//! Every process installs one subscriber with [`init`]: events at or above the configured level
//! are written one line each, as
//!
//! ```text
//! moat-agent[1] INFO container{id=web}: exec{id=sh1}: started pid 42
//! ```
//!
//! i.e. the component and its pid, the level, the spans the event happened in (outermost first,
//! with their fields: the pod, container or exec the work is for), then the message and the
//! event's own fields. Records of the `log` crate (ours and those of dependencies such as
//! containerd-shim, fuse-backend-rs or event-manager) are turned into tracing events too, so
//! nothing bypasses the format or the level.
//!
//! Levels come from the moat configuration (`log_level`): the shim reads it from the TOML file
//! and hands it to moat-vmm (`MOAT_VMM_LOG`) and to the agent (`MOAT_AGENT_LOG` on the guest
//! kernel command line); [`level_from_env`] reads those.

use std::fmt;
use std::fs::File;
use std::sync::Mutex;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

pub use tracing::level_filters::LevelFilter;

/// Errors installing the subscriber.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// Another subscriber (or `log` logger) was installed first in this process.
    #[error("a logger is already installed in this process: {0}")]
    AlreadyInstalled(String),
}

/// Where the lines go.
pub enum Output {
    /// The process's stderr (moat-vmm: its log file; moat-agent: the guest console).
    Stderr,
    /// An open file or FIFO (the shim: containerd's per-shim log FIFO).
    File(File),
}

/// The level named by the environment variable `var` (error, warn, info, debug, trace, off),
/// or `default` when it is unset or not a level.
pub fn level_from_env(var: &str, default: LevelFilter) -> LevelFilter {
    std::env::var(var)
        .ok()
        .and_then(|v| parse_level(&v))
        .unwrap_or(default)
}

/// Parses a level name as written in the moat configuration (case-insensitive).
pub fn parse_level(name: &str) -> Option<LevelFilter> {
    name.trim().parse().ok()
}

/// Installs the process-wide subscriber for `component` (e.g. `moat-vmm`) at `level`, writing
/// to `output`, and routes `log` records into it.
pub fn init(
    component: &'static str,
    level: LevelFilter,
    output: Output,
) -> Result<(), LoggingError> {
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .event_format(LineFormat { component });
    let installed = match output {
        Output::Stderr => builder.with_writer(std::io::stderr).try_init(),
        Output::File(file) => builder.with_writer(Mutex::new(file)).try_init(),
    };
    // With the `tracing-log` feature, `try_init` also routes `log` records (at the same level)
    // into the subscriber.
    installed.map_err(|e| LoggingError::AlreadyInstalled(e.to_string()))
}

/// The line format described in the module documentation.
struct LineFormat {
    component: &'static str,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(
            w,
            "{}[{}] {}: ",
            self.component,
            std::process::id(),
            event.metadata().level()
        )?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                w.write_str(span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        write!(w, "{{{fields}}}")?;
                    }
                }
                w.write_str(": ")?;
            }
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn parses_config_level_names() {
        assert_eq!(parse_level("debug"), Some(LevelFilter::DEBUG));
        assert_eq!(parse_level("WARN"), Some(LevelFilter::WARN));
        assert_eq!(parse_level("off"), Some(LevelFilter::OFF));
        assert_eq!(parse_level("loud"), None);
    }

    /// One subscriber per process: this test owns it (the other tests install none).
    #[test]
    fn lines_carry_component_level_spans_fields_and_log_records() {
        let path = std::env::temp_dir().join(format!("moat-logging-{}", std::process::id()));
        let file = File::create(&path).expect("create log file");
        init("moat-test", LevelFilter::INFO, Output::File(file)).expect("install");
        let pod = tracing::info_span!("pod", id = "p1");
        let _p = pod.enter();
        let container = tracing::info_span!("container", id = "c1");
        let _c = container.enter();
        tracing::info!(pid = 42, "started");
        tracing::debug!("below the level");
        log::warn!("from the log crate");
        assert!(
            init("again", LevelFilter::INFO, Output::Stderr).is_err(),
            "a second subscriber must be refused"
        );

        let mut text = String::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read log file");
        let _ = std::fs::remove_file(&path);
        let lines: Vec<&str> = text.lines().collect();
        let me = std::process::id();
        assert_eq!(
            lines,
            [
                format!("moat-test[{me}] INFO: pod{{id=\"p1\"}}: container{{id=\"c1\"}}: started pid=42"),
                format!("moat-test[{me}] WARN: pod{{id=\"p1\"}}: container{{id=\"c1\"}}: from the log crate"),
            ],
            "{text}"
        );
    }
}
