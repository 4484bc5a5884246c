//! moat-vmm: the KVM virtual machine monitor of moat. One process runs one microVM: an x86_64
//! guest booted from an ELF `vmlinux` (PVH or 64-bit boot protocol) or a bzImage, with an 8250
//! console, an i8042 for reset, ACPI power-off, and virtio-mmio devices (vsock, block, fs, rng,
//! net). `jail` confines the process (namespaces, capabilities, rlimits) before it boots.
//!
//! Layout follows Firecracker's: `arch` (machine), `vstate` (KVM VM and vCPUs), `devices`,
//! `builder` (config → running VM), `api` (control socket), `vmm` (event loop and lifecycle).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod jail;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
