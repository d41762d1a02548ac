//! cargo-fuzz wrapper: the body is `soclink::fuzzing::syslog_rfc3164`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::syslog_rfc3164(data));
