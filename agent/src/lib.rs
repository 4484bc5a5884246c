//! Library half of `moat-agent`: every module of the agent, so that the
//! binary (`src/main.rs`), the integration tests and the fuzz targets
//! (`agent/fuzz/`, entry points in [`fuzzing`]) share one build of the code.
//! See `src/main.rs` for the agent's overview and docs/agent.md for the module layout.
//!
//! In the agent process: [`server`] (ttrpc service) → [`agent`] (state, lookups) →
//! [`sandbox`], [`container`], [`exec`] (lifecycles) → [`process`], [`storage`],
//! [`cgroup`], [`netconf`]; errors in [`error`]. In the `__init` helper: [`init`] (sequence,
//! credentials, exec) and [`rootfs`] (mount tree), driven over [`ipc`] by [`spawn`].

pub mod agent;
pub mod cgroup;
pub mod container;
pub mod error;
pub mod exec;
pub mod fuzzing;
pub mod init;
pub mod ipc;
pub mod logger;
pub mod net;
pub mod netconf;
pub mod pid1;
pub mod portforward;
pub mod process;
pub mod reaper;
pub mod resources;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod signals;
pub mod spawn;
pub mod spec;
pub mod stdio;
pub mod storage;
pub mod sync;
pub mod validate;
