#![no_main]
//! Thin wrapper: the checks live in `engine::repl_proto::fuzzing` so this
//! target cannot rot. Covers `repl_proto::frame_len` and `repl_proto::decode`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::repl_proto::fuzzing::decode_repl(data));
