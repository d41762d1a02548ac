//! cargo-fuzz wrapper: the body is `soclink::fuzzing::bundle_verify`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::bundle_verify(data));
