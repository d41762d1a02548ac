//! cargo-fuzz wrapper: the body is `soclink::fuzzing::tls_pem`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::tls_pem(data));
