//! Fuzz target `net`: see `moat_vmm::fuzzing::fuzz_net` for the input format.
#![cfg_attr(not(feature = "replay"), no_main)]

#[cfg(not(feature = "replay"))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| moat_vmm::fuzzing::fuzz_net(data));

#[cfg(feature = "replay")]
fn main() {
    moat_vmm_fuzz::replay_main("net");
}
