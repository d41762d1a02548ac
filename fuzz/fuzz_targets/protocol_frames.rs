//! cargo-fuzz wrapper: the body is `soclink::fuzzing::protocol_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::protocol_frames(data));
