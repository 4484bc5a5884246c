//! Fuzz target: one byte RPC selector + protobuf request → the agent's
//! decoding, validation and dispatch (see `moat_agent::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = moat_agent::fuzzing::agent_request(data);
});
