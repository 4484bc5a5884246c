//! moat-cli's library part: what the `moat` command shares with the E2E trials and the
//! benchmarks (the local busybox image builder, the private containerd's config), and the
//! commands that are tested on their own: containerd's configuration and `moat install`
//! ([`containerd_config`], [`install`]), `moat ps` and `moat logs` ([`ps`], [`logs`]), over the
//! `/proc` readings of [`procfs`].

pub mod containerd;
pub mod containerd_config;
pub mod image;
pub mod install;
pub mod logs;
pub mod metrics;
pub mod procfs;
pub mod ps;
