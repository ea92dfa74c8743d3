//! Every bound of the wire protocol, named, with its default.
//!
//! The codec takes a `&Limits` rather than reading constants so a server can be
//! configured (and a test can shrink a limit to reach its edge cheaply). The
//! `*_DEFAULT` constants are the values PROTOCOL.md v1 promises to clients.

/// The protocol version this crate speaks; HELLO and WELCOME carry it.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes of the `u32 len` prefix in front of every frame.
pub const FRAME_HEADER_LEN: usize = 4;

/// A `str` field carries a `u8` length, so no string on the wire exceeds this.
pub const STR_LEN_MAX: usize = u8::MAX as usize;

/// HELLO carries the token length as a `u16`.
pub const TOKEN_WIRE_LEN_MAX: usize = u16::MAX as usize;

/// Number of routing slots: `slot = fnv1a64(user) % SLOT_COUNT`.
pub const SLOT_COUNT: u16 = 16384;

/// Max of the `len` field (type byte + payload). Announced in WELCOME.
pub const FRAME_LEN_MAX_DEFAULT: u32 = 65536;
/// Max SEND/DELIVER body. 64 bytes below the frame limit, as PROTOCOL.md says.
pub const BODY_LEN_MAX_DEFAULT: u32 = FRAME_LEN_MAX_DEFAULT - 64;
/// Max user id length in bytes (UTF-8).
pub const USER_ID_LEN_MAX_DEFAULT: usize = 64;
/// Max HELLO token length in bytes.
pub const TOKEN_LEN_MAX_DEFAULT: usize = 4096;

/// Fixed bytes of a DELIVER frame besides `from` and `body`:
/// type 1 + seq 8 + msg_id 16 + str length 1 + sent_ms 8.
pub const DELIVER_FIXED_LEN: usize = 1 + 8 + 16 + 1 + 8;
/// Fixed bytes of a SEND frame besides `to` and `body`: type 1 + msg_id 16 + str length 1.
pub const SEND_FIXED_LEN: usize = 1 + 16 + 1;
/// Fixed bytes of a HELLO frame besides `user` and the token:
/// type 1 + version 1 + str length 1 + token length 2.
pub const HELLO_FIXED_LEN: usize = 1 + 1 + 1 + 2;

// A body must leave room for the rest of the frame, or no SEND could carry it.
const _: () = assert!(BODY_LEN_MAX_DEFAULT < FRAME_LEN_MAX_DEFAULT);
// A user id travels in a `str` field.
const _: () = assert!(USER_ID_LEN_MAX_DEFAULT <= STR_LEN_MAX);
// The token length travels as a u16.
const _: () = assert!(TOKEN_LEN_MAX_DEFAULT <= TOKEN_WIRE_LEN_MAX);
// A HELLO with the longest user id and token must fit in one frame.
const _: () = assert!(
    HELLO_FIXED_LEN + USER_ID_LEN_MAX_DEFAULT + TOKEN_LEN_MAX_DEFAULT
        <= FRAME_LEN_MAX_DEFAULT as usize
);
// The frame length must fit the 32-bit length field and a usize (we add the header).
const _: () = assert!((FRAME_LEN_MAX_DEFAULT as usize) < usize::MAX - FRAME_HEADER_LEN);

/// Protocol bounds a codec instance enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Max of the u32 `len` field (type + payload). Bigger is ERROR 3.
    pub frame_len_max: u32,
    /// Max body of a SEND. Bigger is REJECTED 2 (a server check, not the decoder's).
    pub body_len_max: u32,
    /// Max user id length in bytes (a server check via [`crate::valid_user_id`]).
    pub user_id_len_max: usize,
    /// Max HELLO token length in bytes (a decoder check: Malformed, ERROR 1).
    pub token_len_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            frame_len_max: FRAME_LEN_MAX_DEFAULT,
            body_len_max: BODY_LEN_MAX_DEFAULT,
            user_id_len_max: USER_ID_LEN_MAX_DEFAULT,
            token_len_max: TOKEN_LEN_MAX_DEFAULT,
        }
    }
}

impl Limits {
    /// Largest server frame a client accepts.
    ///
    /// Why not just `frame_len_max`: with the v1 defaults a DELIVER of a
    /// max-size body (65472) from a 64-byte sender is 34 + 64 + 65472 = 65570
    /// bytes, above the 65536 frame limit. The message is already stored when
    /// it is delivered, so refusing the frame would wedge that inbox forever;
    /// the client accepts the largest DELIVER the limits allow instead.
    pub fn server_frame_len_max(&self) -> u32 {
        let deliver_len_max = DELIVER_FIXED_LEN as u64
            + self.user_id_len_max.min(STR_LEN_MAX) as u64
            + u64::from(self.body_len_max);
        let deliver_len_max = u32::try_from(deliver_len_max).unwrap_or(u32::MAX);
        self.frame_len_max.max(deliver_len_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_protocol_v1() {
        let limits = Limits::default();
        assert_eq!(limits.frame_len_max, 65536);
        assert_eq!(limits.body_len_max, 65536 - 64);
        assert_eq!(limits.user_id_len_max, 64);
        assert_eq!(limits.token_len_max, 4096);
        assert_eq!(PROTOCOL_VERSION, 1);
    }

    #[test]
    fn server_frame_len_max_covers_largest_deliver() {
        assert_eq!(Limits::default().server_frame_len_max(), 65570);
        let small = Limits {
            frame_len_max: 1000,
            body_len_max: 10,
            ..Limits::default()
        };
        assert_eq!(small.server_frame_len_max(), 1000);
    }
}
