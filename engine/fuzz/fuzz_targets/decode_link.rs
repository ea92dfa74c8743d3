#![no_main]
//! Thin wrapper: the checks live in `engine::link_proto::fuzzing` so this
//! target cannot rot. Covers `link_proto::frame_len` and `link_proto::decode`
//! (every byte an edge or a core node reads from a node link).

libfuzzer_sys::fuzz_target!(|data: &[u8]| engine::link_proto::fuzzing::decode_link(data));
