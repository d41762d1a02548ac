//! cargo-fuzz wrapper: the body is `soclink::fuzzing::spool_recovery`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::spool_recovery(data));
