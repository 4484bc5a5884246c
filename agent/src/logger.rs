//! The agent's logging set-up: moat's tracing subscriber (crate `moat-logging`) writing one
//! line per event to stderr, which is the guest console (`/dev/console`) when the agent runs
//! as PID 1, so the host finds the agent's log in the pod's `console.log`.

/// Installs the subscriber. The level comes from `MOAT_AGENT_LOG` (error, warn, info, debug,
/// trace; default info); as PID 1 the kernel passes unknown `KEY=value` command-line words as
/// environment, and the shim puts the configured `log_level` there.
pub fn init() {
    let level = moat_logging::level_from_env("MOAT_AGENT_LOG", moat_logging::LevelFilter::INFO);
    // Only fails if a subscriber exists already (a test harness): keep that one.
    let _ = moat_logging::init("moat-agent", level, moat_logging::Output::Stderr);
}
