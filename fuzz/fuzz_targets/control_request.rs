//! cargo-fuzz wrapper: the body is `soclink::fuzzing::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::control_request(data));
