//! cargo-fuzz wrapper: the body is `soclink::fuzzing::relay_store_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::relay_store_state(data));
