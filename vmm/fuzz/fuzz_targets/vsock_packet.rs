//! Fuzz target `vsock_packet`: see `moat_vmm::fuzzing::fuzz_vsock_packet` for the input format.
#![cfg_attr(not(feature = "replay"), no_main)]

#[cfg(not(feature = "replay"))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_vmm::fuzzing::fuzz_vsock_packet(data));

#[cfg(feature = "replay")]
fn main() {
    moat_vmm_fuzz::replay_main("vsock_packet");
}
