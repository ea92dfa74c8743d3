#![no_main]
//! Thin wrapper: the checks live in `engine::record::fuzzing` so this target
//! cannot rot. The first byte is the record type, the rest the payload.

libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::record::fuzzing::decode_record(data));
