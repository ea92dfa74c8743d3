#![no_main]
//! Thin wrapper: the checks live in `mqtt::fuzzing` so this target cannot rot.

libfuzzer_sys::fuzz_target!(|data: &[u8]| mqtt::fuzzing::decode(data));
