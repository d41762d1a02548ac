//! cargo-fuzz wrapper: the body is `soclink::fuzzing::syslog_rfc5424`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::syslog_rfc5424(data));
