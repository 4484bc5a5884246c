//! moat-cli's library part: what the `moat` command shares with the E2E trials and the
//! benchmarks (the local busybox image builder, the private containerd's config).

pub mod containerd;
pub mod image;
