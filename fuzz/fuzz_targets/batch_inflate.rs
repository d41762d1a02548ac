//! cargo-fuzz wrapper: the body is `soclink::fuzzing::batch_inflate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::batch_inflate(data));
