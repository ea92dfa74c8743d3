//! Iris wire protocol: the sans-IO codec of docs/PROTOCOL.md v1, its limits,
//! and a blocking client library.
//!
//! The codec never touches the kernel (the server's event loop owns the I/O);
//! the client is plain `std::net` for the CLI, tests and simple tools.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod limits;
pub mod user_id;

pub use client::{
    host_of, new_msg_id, tls_connect, Client, ClientError, Delivered, Event, Stream, TlsSettings,
    Welcome,
};
pub use codec::{
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
    encoded_len_client, encoded_len_server, error_code, frame_type, reject_code, ClientFrame,
    DecodeError, MsgId, ServerFrame,
};
pub use limits::{Limits, PROTOCOL_VERSION, SLOT_COUNT};
pub use rustls;
pub use user_id::{
    check_user_id, user_id_from_bytes, valid_user_id, UserIdError, USER_ID_RESERVED_CHARS,
};

const FNV1A64_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The routing slot of a user: FNV-1a 64 of the id's UTF-8 bytes, mod 16384.
///
/// Fixed forever: slots name shards in every deployment's slot map and in data
/// on disk, so the hash must agree across versions, machines and languages
/// (which is why it is not Rust's randomized `DefaultHasher`).
pub fn slot_of(user: &str) -> u16 {
    let hash = user.bytes().fold(FNV1A64_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV1A64_PRIME)
    });
    // The remainder is < SLOT_COUNT, which fits in a u16.
    (hash % u64::from(SLOT_COUNT)) as u16
}

/// Entry points for fuzzers (net/fuzz). Thin wrappers, so the targets cannot rot.
#[doc(hidden)]
pub mod fuzzing {
    use crate::codec::{
        decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame,
    };
    use crate::limits::Limits;

    /// Decodes every frame in `data`; asserts what must hold for any input:
    /// progress stays in bounds and a decoded frame re-encodes to its bytes.
    pub fn decode_client(data: &[u8]) {
        let limits = Limits::default();
        let mut rest = data;
        while let Ok(Some((frame, consumed))) = decode_client_frame(rest, &limits) {
            assert!(consumed <= rest.len());
            let mut out = Vec::new();
            encode_client_frame(&frame, &mut out);
            assert_eq!(out, &rest[..consumed]);
            rest = &rest[consumed..];
        }
    }

    /// The server-frame counterpart of [`decode_client`].
    pub fn decode_server(data: &[u8]) {
        let limits = Limits::default();
        let mut rest = data;
        while let Ok(Some((frame, consumed))) = decode_server_frame(rest, &limits) {
            assert!(consumed <= rest.len());
            let mut out = Vec::new();
            encode_server_frame(&frame, &mut out);
            assert_eq!(out, &rest[..consumed]);
            rest = &rest[consumed..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values (computed independently): if these change, every slot map
    /// and every stored shard assignment breaks.
    #[test]
    fn slot_of_is_pinned_fnv1a64_mod_16384() {
        assert_eq!(slot_of(""), 8997); // the FNV-1a offset basis itself
        assert_eq!(slot_of("a"), 11404); // 0xaf63dc4c8601ec8c
        assert_eq!(slot_of("alice"), 14599); // 0x508b2abb65a03907
        assert_eq!(slot_of("élève"), 3649); // UTF-8 bytes, not chars
    }
}
