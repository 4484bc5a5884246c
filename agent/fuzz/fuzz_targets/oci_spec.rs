//! Fuzz target: `config.json` bytes → the agent's OCI spec parsing and
//! validation (see `moat_agent::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat_agent::fuzzing::oci_spec(data);
});
