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
pub mod metrics;
pub mod seccomp;
pub mod vmm;
pub mod vstate;

/// Stack size of every thread moat-vmm starts: just under 2 MiB (Rust's default is 2 MiB).
///
/// A thread stack is an anonymous mapping; on a host whose THP setting is `always` (Debian's
/// default) a 2 MiB stack that happens to be 2 MiB-aligned is backed by one huge page at its
/// first touch, so 2 MiB resident instead of a few KiB. Guest RAM is mapped 2 MiB-aligned
/// (`arch::x86_64::layout`), which makes the next mapping below it, a thread stack, end aligned:
/// measured 2 MiB more PSS per VMM. A stack mapping (with its guard page) smaller than 2 MiB
/// can never hold a huge page.
pub const THREAD_STACK_SIZE: usize = (2 << 20) - (128 << 10);

/// A [`std::thread::Builder`] named `name` with the VMM's stack size ([`THREAD_STACK_SIZE`]).
pub fn thread_builder(name: impl Into<String>) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK_SIZE)
}
