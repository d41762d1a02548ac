//! cargo-fuzz wrapper: the body is `soclink::fuzzing::intel_items`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::intel_items(data));
