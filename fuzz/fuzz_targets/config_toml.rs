//! cargo-fuzz wrapper: the body is `soclink::fuzzing::config_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| soclink::fuzzing::config_toml(data));
