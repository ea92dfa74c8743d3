#![no_main]
//! Thin wrapper: the checks live in `net::fuzzing` so this target cannot rot.

libfuzzer_sys::fuzz_target!(|data: &[u8]| net::fuzzing::decode_server(data));
