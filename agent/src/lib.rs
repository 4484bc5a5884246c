//! Library half of `moat-agent`: every module of the agent, so that the
//! binary (`src/main.rs`), the integration tests and the fuzz targets
//! (`agent/fuzz/`, entry points in [`fuzzing`]) share one build of the code.
//! See `src/main.rs` for the agent's overview.

pub mod cgroup;
pub mod container;
pub mod fuzzing;
pub mod init;
pub mod ipc;
pub mod logger;
pub mod net;
pub mod netconf;
pub mod pid1;
pub mod reaper;
pub mod seccomp;
pub mod server;
pub mod spawn;
pub mod spec;
pub mod stdio;
