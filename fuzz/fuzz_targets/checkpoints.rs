//! cargo-fuzz wrapper: the body is `soclink::fuzzing::checkpoints`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::checkpoints(data));
