//! cargo-fuzz wrapper: the body is `soclink::fuzzing::incident_record`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::incident_record(data));
