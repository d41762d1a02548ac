//! cargo-fuzz wrapper: the body is `soclink::fuzzing::event_encode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::event_encode(data));
