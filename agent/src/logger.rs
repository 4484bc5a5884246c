//! Minimal `log` backend writing one line per record to stderr, which is
//! the console (`/dev/console`) when the agent runs as PID 1.

use std::io::Write;

struct ConsoleLogger {
    level: log::LevelFilter,
}

impl log::Log for ConsoleLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            // One write per line so concurrent records do not interleave.
            let line = format!(
                "moat-agent[{}] {}: {}\n",
                std::process::id(),
                record.level(),
                record.args()
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger. The level comes from `MOAT_AGENT_LOG` (error, warn,
/// info, debug, trace; default info); as PID 1 the kernel passes unknown
/// `KEY=value` command-line words as environment, so it can be set there.
pub fn init() {
    let level = std::env::var("MOAT_AGENT_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(ConsoleLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
