//! Sans-IO codec for the Iris wire protocol v1 (docs/PROTOCOL.md).
//!
//! Bytes in, frames out: nothing here touches a socket, so the event loop, the
//! blocking client, the simulator and the fuzzers all share one parser.
//!
//! Division of labour with the server: the decoder checks framing (length
//! bounds), field lengths, UTF-8 of every `str`, trailing bytes and the token
//! length. It does not check the HELLO version (ERROR 4), user id rules (ERROR 1
//! / REJECTED 1 via [`crate::valid_user_id`]) or the body limit (REJECTED 2);
//! those get different answers, so the server applies them.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! frame    = u32 len (type + payload, 1..=frame_len_max) | u8 type | payload
//! str      = u8 n | n bytes of UTF-8
//! id16     = 16 bytes
//! body     = the rest of the frame
//! HELLO    0x01  u8 version | str user | u16 token_len | token
//! WELCOME  0x02  u8 version | u64 server_time_ms | u32 max_frame | u64 pending
//! SEND     0x10  id16 msg_id | str to | body
//! STORED   0x11  id16 msg_id
//! REJECTED 0x12  id16 msg_id | u16 code | str reason
//! DELIVER  0x20  u64 seq | id16 msg_id | str from | u64 sent_ms | body
//! ACK      0x21  u64 seq
//! PING     0x30  u64 nonce
//! PONG     0x31  u64 nonce
//! BYE      0x40  (empty)
//! ERROR    0x7F  u16 code | str reason
//! ```

use crate::limits::{Limits, FRAME_HEADER_LEN, STR_LEN_MAX};

/// Frame type bytes.
pub mod frame_type {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SEND: u8 = 0x10;
    pub const STORED: u8 = 0x11;
    pub const REJECTED: u8 = 0x12;
    pub const DELIVER: u8 = 0x20;
    pub const ACK: u8 = 0x21;
    pub const PING: u8 = 0x30;
    pub const PONG: u8 = 0x31;
    pub const BYE: u8 = 0x40;
    pub const ERROR: u8 = 0x7F;
}

/// Codes carried by REJECTED (the SEND failed; the connection stays open).
pub mod reject_code {
    pub const BAD_RECIPIENT: u16 = 1;
    pub const TOO_LARGE: u16 = 2;
    pub const RATE_LIMITED: u16 = 3;
    pub const UNAVAILABLE: u16 = 4;
    pub const INBOX_FULL: u16 = 5;
    pub const TIMED_OUT: u16 = 6;
}

/// Codes carried by ERROR (the server closes the connection after it).
pub mod error_code {
    pub const PROTOCOL_VIOLATION: u16 = 1;
    pub const AUTH_FAILED: u16 = 2;
    pub const FRAME_TOO_LARGE: u16 = 3;
    pub const UNSUPPORTED_VERSION: u16 = 4;
    pub const SHUTTING_DOWN: u16 = 5;
    pub const IDLE_TIMEOUT: u16 = 6;
    pub const TOO_MANY_CONNECTIONS: u16 = 7;
}

/// A message id, chosen by the sender (a UUID fits).
pub type MsgId = [u8; 16];

/// A frame a client sends. Borrowed from the input buffer: no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Hello {
        version: u8,
        user: &'a str,
        token: &'a [u8],
    },
    Send {
        msg_id: MsgId,
        to: &'a str,
        body: &'a [u8],
    },
    Ack {
        seq: u64,
    },
    Ping {
        nonce: u64,
    },
    Bye,
}

/// A frame a server sends. Borrowed from the input buffer: no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame<'a> {
    Welcome {
        version: u8,
        server_time_ms: u64,
        max_frame: u32,
        pending: u64,
    },
    Stored {
        msg_id: MsgId,
    },
    Rejected {
        msg_id: MsgId,
        code: u16,
        reason: &'a str,
    },
    Deliver {
        seq: u64,
        msg_id: MsgId,
        from: &'a str,
        sent_ms: u64,
        body: &'a [u8],
    },
    Pong {
        nonce: u64,
    },
    Error {
        code: u16,
        reason: &'a str,
    },
}

/// Why bytes from a peer are not a valid frame. Every variant closes the connection.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame length {len} exceeds the maximum {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("frame length is zero")]
    ZeroLength,
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl DecodeError {
    /// The PROTOCOL.md ERROR code the server answers this with before closing.
    pub fn error_code(&self) -> u16 {
        match self {
            DecodeError::FrameTooLarge { .. } => error_code::FRAME_TOO_LARGE,
            DecodeError::ZeroLength | DecodeError::UnknownType(_) | DecodeError::Malformed(_) => {
                error_code::PROTOCOL_VIOLATION
            }
        }
    }
}

/// Malformed reasons, named so tests and logs agree on them.
pub mod malformed {
    pub const TRUNCATED: &str = "field runs past the end of the frame";
    pub const TRAILING: &str = "trailing bytes after the last field";
    pub const BAD_UTF8: &str = "string field is not valid UTF-8";
    pub const TOKEN_TOO_LONG: &str = "token longer than token_len_max";
}

/// Bounded cursor over one frame's payload. Every read is bounds-checked, so
/// no input can make the decoder panic or read past the frame.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .ok_or(DecodeError::Malformed(malformed::TRUNCATED))?;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError::Malformed(malformed::TRUNCATED))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8()?);
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed(malformed::BAD_UTF8))
    }

    /// The `body` field: everything left in the frame.
    fn rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        rest
    }

    /// Every frame must be consumed exactly; extra bytes mean a confused peer.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(malformed::TRAILING))
        }
    }
}

/// Splits the next frame off `buf`: Ok(None) until it is whole. The length is
/// checked against `len_max` as soon as the 4 header bytes are there, so a peer
/// cannot make us buffer an oversize frame before we refuse it.
fn split_frame(buf: &[u8], len_max: u32) -> Result<Option<(&[u8], usize)>, DecodeError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Ok(None);
    };
    let mut len_bytes = [0u8; FRAME_HEADER_LEN];
    len_bytes.copy_from_slice(header);
    let len = u32::from_le_bytes(len_bytes);
    if len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    if len > len_max {
        return Err(DecodeError::FrameTooLarge { len, max: len_max });
    }
    let consumed = usize::try_from(len)
        .ok()
        .and_then(|len| len.checked_add(FRAME_HEADER_LEN))
        .ok_or(DecodeError::FrameTooLarge { len, max: len_max })?;
    Ok(buf
        .get(FRAME_HEADER_LEN..consumed)
        .map(|frame| (frame, consumed)))
}

/// Decodes the next client frame from `buf`.
///
/// Ok(None): `buf` does not yet hold a whole frame. Ok(Some((frame, consumed)))
/// otherwise, with `consumed` = 4 + len.
pub fn decode_client_frame<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(ClientFrame<'a>, usize)>, DecodeError> {
    let Some((frame, consumed)) = split_frame(buf, limits.frame_len_max)? else {
        return Ok(None);
    };
    let mut r = Reader::new(frame);
    let decoded = match r.u8()? {
        frame_type::HELLO => decode_hello(&mut r, limits)?,
        frame_type::SEND => ClientFrame::Send {
            msg_id: r.array()?,
            to: r.str()?,
            body: r.rest(),
        },
        frame_type::ACK => ClientFrame::Ack { seq: r.u64()? },
        frame_type::PING => ClientFrame::Ping { nonce: r.u64()? },
        frame_type::BYE => ClientFrame::Bye,
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(Some((decoded, consumed)))
}

fn decode_hello<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<ClientFrame<'a>, DecodeError> {
    let version = r.u8()?;
    let user = r.str()?;
    let token_len = usize::from(r.u16()?);
    // Checked before the bytes are taken: the limit is the answer even if the
    // token is also truncated.
    if token_len > limits.token_len_max {
        return Err(DecodeError::Malformed(malformed::TOKEN_TOO_LONG));
    }
    let token = r.take(token_len)?;
    Ok(ClientFrame::Hello {
        version,
        user,
        token,
    })
}

/// Decodes the next server frame from `buf`; the client side of
/// [`decode_client_frame`].
///
/// The length bound is [`Limits::server_frame_len_max`], not `frame_len_max`:
/// a DELIVER of a max-size body from a max-length sender exceeds the frame
/// limit under the v1 defaults, and the client must still accept it.
pub fn decode_server_frame<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(ServerFrame<'a>, usize)>, DecodeError> {
    let Some((frame, consumed)) = split_frame(buf, limits.server_frame_len_max())? else {
        return Ok(None);
    };
    let mut r = Reader::new(frame);
    let decoded = match r.u8()? {
        frame_type::WELCOME => ServerFrame::Welcome {
            version: r.u8()?,
            server_time_ms: r.u64()?,
            max_frame: r.u32()?,
            pending: r.u64()?,
        },
        frame_type::STORED => ServerFrame::Stored { msg_id: r.array()? },
        frame_type::REJECTED => ServerFrame::Rejected {
            msg_id: r.array()?,
            code: r.u16()?,
            reason: r.str()?,
        },
        frame_type::DELIVER => ServerFrame::Deliver {
            seq: r.u64()?,
            msg_id: r.array()?,
            from: r.str()?,
            sent_ms: r.u64()?,
            body: r.rest(),
        },
        frame_type::PONG => ServerFrame::Pong { nonce: r.u64()? },
        frame_type::ERROR => ServerFrame::Error {
            code: r.u16()?,
            reason: r.str()?,
        },
        other => return Err(DecodeError::UnknownType(other)),
    };
    r.finish()?;
    Ok(Some((decoded, consumed)))
}

/// Cuts `s` to at most `max` bytes without splitting a character, so a long
/// human-readable reason still travels as valid UTF-8.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Bytes of a `str` field holding `s`. Panics if `s` cannot be encoded: that
/// is a caller bug (the client library checks recipient lengths first).
fn str_field_len(s: &str) -> usize {
    assert!(
        s.len() <= STR_LEN_MAX,
        "str field of {} bytes exceeds {STR_LEN_MAX}",
        s.len()
    );
    1 + s.len()
}

/// Exact bytes [`encode_client_frame`] appends (header included).
pub fn encoded_len_client(frame: &ClientFrame<'_>) -> usize {
    let len = 1 + match frame {
        ClientFrame::Hello { user, token, .. } => 1 + str_field_len(user) + 2 + token.len(),
        ClientFrame::Send { to, body, .. } => 16 + str_field_len(to) + body.len(),
        ClientFrame::Ack { .. } | ClientFrame::Ping { .. } => 8,
        ClientFrame::Bye => 0,
    };
    FRAME_HEADER_LEN + len
}

/// Exact bytes [`encode_server_frame`] appends (header included).
pub fn encoded_len_server(frame: &ServerFrame<'_>) -> usize {
    let reason_len = |reason: &str| 1 + truncate_str(reason, STR_LEN_MAX).len();
    let len = 1 + match frame {
        ServerFrame::Welcome { .. } => 1 + 8 + 4 + 8,
        ServerFrame::Stored { .. } => 16,
        ServerFrame::Rejected { reason, .. } => 16 + 2 + reason_len(reason),
        ServerFrame::Deliver { from, body, .. } => 8 + 16 + str_field_len(from) + 8 + body.len(),
        ServerFrame::Pong { .. } => 8,
        ServerFrame::Error { reason, .. } => 2 + reason_len(reason),
    };
    FRAME_HEADER_LEN + len
}

/// Appends frames to a buffer and checks, at the end, that it wrote exactly
/// the length it announced.
struct Writer<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
    expected: usize,
}

impl<'o> Writer<'o> {
    fn begin(out: &'o mut Vec<u8>, encoded_len: usize, ty: u8) -> Self {
        let len = u32::try_from(encoded_len - FRAME_HEADER_LEN)
            .expect("frame length does not fit the u32 length field");
        let start = out.len();
        out.reserve(encoded_len);
        out.extend_from_slice(&len.to_le_bytes());
        out.push(ty);
        Writer {
            out,
            start,
            expected: encoded_len,
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    fn str(&mut self, s: &str) {
        let len = u8::try_from(s.len()).expect("str field longer than 255 bytes");
        self.out.push(len);
        self.out.extend_from_slice(s.as_bytes());
    }

    fn end(self) {
        assert_eq!(
            self.out.len() - self.start,
            self.expected,
            "encoder wrote a different length than it announced"
        );
    }
}

/// Appends `frame` to `out`. Panics on a frame that cannot be represented (a
/// `str` over 255 bytes, a token over 65535 bytes): a caller bug. Frames over
/// a peer's `frame_len_max` are encoded as asked (tests send them on purpose).
pub fn encode_client_frame(frame: &ClientFrame<'_>, out: &mut Vec<u8>) {
    let len = encoded_len_client(frame);
    match frame {
        ClientFrame::Hello {
            version,
            user,
            token,
        } => {
            let token_len = u16::try_from(token.len()).expect("token longer than 65535 bytes");
            let mut w = Writer::begin(out, len, frame_type::HELLO);
            w.bytes(&[*version]);
            w.str(user);
            w.bytes(&token_len.to_le_bytes());
            w.bytes(token);
            w.end();
        }
        ClientFrame::Send { msg_id, to, body } => {
            let mut w = Writer::begin(out, len, frame_type::SEND);
            w.bytes(msg_id);
            w.str(to);
            w.bytes(body);
            w.end();
        }
        ClientFrame::Ack { seq } => u64_frame(out, frame_type::ACK, *seq),
        ClientFrame::Ping { nonce } => u64_frame(out, frame_type::PING, *nonce),
        ClientFrame::Bye => Writer::begin(out, len, frame_type::BYE).end(),
    }
}

fn u64_frame(out: &mut Vec<u8>, ty: u8, value: u64) {
    let mut w = Writer::begin(out, FRAME_HEADER_LEN + 1 + 8, ty);
    w.bytes(&value.to_le_bytes());
    w.end();
}

/// Appends `frame` to `out`. A reason longer than 255 bytes is cut on a
/// character boundary (it is for humans; the code carries the meaning).
pub fn encode_server_frame(frame: &ServerFrame<'_>, out: &mut Vec<u8>) {
    let len = encoded_len_server(frame);
    match frame {
        ServerFrame::Welcome {
            version,
            server_time_ms,
            max_frame,
            pending,
        } => {
            let mut w = Writer::begin(out, len, frame_type::WELCOME);
            w.bytes(&[*version]);
            w.bytes(&server_time_ms.to_le_bytes());
            w.bytes(&max_frame.to_le_bytes());
            w.bytes(&pending.to_le_bytes());
            w.end();
        }
        ServerFrame::Stored { msg_id } => {
            let mut w = Writer::begin(out, len, frame_type::STORED);
            w.bytes(msg_id);
            w.end();
        }
        ServerFrame::Rejected {
            msg_id,
            code,
            reason,
        } => {
            let mut w = Writer::begin(out, len, frame_type::REJECTED);
            w.bytes(msg_id);
            w.bytes(&code.to_le_bytes());
            w.str(truncate_str(reason, STR_LEN_MAX));
            w.end();
        }
        ServerFrame::Deliver {
            seq,
            msg_id,
            from,
            sent_ms,
            body,
        } => {
            let mut w = Writer::begin(out, len, frame_type::DELIVER);
            w.bytes(&seq.to_le_bytes());
            w.bytes(msg_id);
            w.str(from);
            w.bytes(&sent_ms.to_le_bytes());
            w.bytes(body);
            w.end();
        }
        ServerFrame::Pong { nonce } => u64_frame(out, frame_type::PONG, *nonce),
        ServerFrame::Error { code, reason } => {
            let mut w = Writer::begin(out, len, frame_type::ERROR);
            w.bytes(&code.to_le_bytes());
            w.str(truncate_str(reason, STR_LEN_MAX));
            w.end();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::TOKEN_LEN_MAX_DEFAULT;

    const ID: MsgId = *b"0123456789abcdef";

    fn client_samples() -> Vec<ClientFrame<'static>> {
        vec![
            ClientFrame::Hello {
                version: 1,
                user: "alice",
                token: b"secret",
            },
            ClientFrame::Hello {
                version: 1,
                user: "",
                token: b"",
            },
            ClientFrame::Send {
                msg_id: ID,
                to: "bob",
                body: b"hi bob",
            },
            ClientFrame::Send {
                msg_id: [0xff; 16],
                to: "żółw",
                body: b"",
            },
            ClientFrame::Ack { seq: u64::MAX },
            ClientFrame::Ping { nonce: 7 },
            ClientFrame::Bye,
        ]
    }

    fn server_samples() -> Vec<ServerFrame<'static>> {
        vec![
            ServerFrame::Welcome {
                version: 1,
                server_time_ms: 1_700_000_000_000,
                max_frame: 65536,
                pending: 3,
            },
            ServerFrame::Stored { msg_id: ID },
            ServerFrame::Rejected {
                msg_id: ID,
                code: reject_code::INBOX_FULL,
                reason: "inbox full",
            },
            ServerFrame::Deliver {
                seq: 1,
                msg_id: ID,
                from: "alice",
                sent_ms: 42,
                body: b"hi bob",
            },
            ServerFrame::Deliver {
                seq: 2,
                msg_id: ID,
                from: "a",
                sent_ms: 0,
                body: b"",
            },
            ServerFrame::Pong { nonce: u64::MAX },
            ServerFrame::Error {
                code: error_code::IDLE_TIMEOUT,
                reason: "",
            },
        ]
    }

    fn encode_client_all(frames: &[ClientFrame<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        frames.iter().for_each(|f| encode_client_frame(f, &mut out));
        out
    }

    fn encode_server_all(frames: &[ServerFrame<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        frames.iter().for_each(|f| encode_server_frame(f, &mut out));
        out
    }

    /// A frame with the given type byte and payload, length header included.
    fn raw(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
        out.push(ty);
        out.extend_from_slice(payload);
        out
    }

    fn client_err(buf: &[u8]) -> DecodeError {
        decode_client_frame(buf, &Limits::default()).expect_err("must not decode")
    }

    fn server_err(buf: &[u8]) -> DecodeError {
        decode_server_frame(buf, &Limits::default()).expect_err("must not decode")
    }

    #[test]
    fn every_client_frame_round_trips() {
        for frame in client_samples() {
            let mut out = vec![0xAA]; // encode appends: existing bytes stay
            encode_client_frame(&frame, &mut out);
            assert_eq!(out[0], 0xAA);
            let bytes = &out[1..];
            assert_eq!(bytes.len(), encoded_len_client(&frame));
            let (decoded, consumed) = decode_client_frame(bytes, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(decoded, frame);
            assert_eq!(consumed, bytes.len());
        }
    }

    #[test]
    fn every_server_frame_round_trips() {
        for frame in server_samples() {
            let mut out = vec![0xAA];
            encode_server_frame(&frame, &mut out);
            let bytes = &out[1..];
            assert_eq!(bytes.len(), encoded_len_server(&frame));
            let (decoded, consumed) = decode_server_frame(bytes, &Limits::default())
                .unwrap()
                .unwrap();
            assert_eq!(decoded, frame);
            assert_eq!(consumed, bytes.len());
        }
    }

    #[test]
    fn layouts_are_little_endian_as_documented() {
        let mut out = Vec::new();
        encode_client_frame(&ClientFrame::Ack { seq: 0x0102 }, &mut out);
        assert_eq!(out, [9, 0, 0, 0, 0x21, 2, 1, 0, 0, 0, 0, 0, 0]);
        out.clear();
        encode_server_frame(
            &ServerFrame::Error {
                code: 3,
                reason: "x",
            },
            &mut out,
        );
        assert_eq!(out, [5, 0, 0, 0, 0x7F, 3, 0, 1, b'x']);
    }

    /// Feeding a valid stream cut at any byte yields exactly the frames that
    /// are whole, then Ok(None): "not enough bytes yet" is a state, not an error.
    #[test]
    fn every_split_point_of_a_client_stream_is_ok_none() {
        let frames = client_samples();
        let stream = encode_client_all(&frames);
        for cut in 0..=stream.len() {
            let mut rest = &stream[..cut];
            let mut decoded = Vec::new();
            while let Some((frame, consumed)) = decode_client_frame(rest, &Limits::default())
                .unwrap_or_else(|e| panic!("cut {cut}: {e}"))
            {
                decoded.push(frame);
                rest = &rest[consumed..];
            }
            assert_eq!(decoded[..], frames[..decoded.len()], "cut {cut}");
            assert_eq!(rest.is_empty(), encode_client_all(&decoded).len() == cut);
        }
    }

    #[test]
    fn every_split_point_of_a_server_stream_is_ok_none() {
        let frames = server_samples();
        let stream = encode_server_all(&frames);
        for cut in 0..=stream.len() {
            let mut rest = &stream[..cut];
            let mut decoded = Vec::new();
            while let Some((frame, consumed)) = decode_server_frame(rest, &Limits::default())
                .unwrap_or_else(|e| panic!("cut {cut}: {e}"))
            {
                decoded.push(frame);
                rest = &rest[consumed..];
            }
            assert_eq!(decoded[..], frames[..decoded.len()], "cut {cut}");
            assert_eq!(rest.is_empty(), encode_server_all(&decoded).len() == cut);
        }
        assert_eq!(
            decode_server_frame(&stream, &Limits::default())
                .unwrap()
                .unwrap()
                .0,
            frames[0]
        );
    }

    #[test]
    fn zero_length_is_an_error_as_soon_as_the_header_is_there() {
        assert_eq!(
            decode_client_frame(&[0, 0, 0], &Limits::default()),
            Ok(None)
        );
        assert_eq!(client_err(&[0, 0, 0, 0]), DecodeError::ZeroLength);
        assert_eq!(server_err(&[0, 0, 0, 0]), DecodeError::ZeroLength);
        assert_eq!(DecodeError::ZeroLength.error_code(), 1);
    }

    #[test]
    fn oversize_length_is_detected_from_the_header_alone() {
        let too_large = DecodeError::FrameTooLarge {
            len: 65537,
            max: 65536,
        };
        assert_eq!(client_err(&65537u32.to_le_bytes()), too_large);
        assert_eq!(client_err(&u32::MAX.to_le_bytes()).error_code(), 3);
        // At the limit: not an error, just waiting for the rest.
        let at_max = 65536u32.to_le_bytes();
        assert_eq!(decode_client_frame(&at_max, &Limits::default()), Ok(None));
        // The server side allows the largest DELIVER the limits permit (see Limits).
        let server_max = Limits::default().server_frame_len_max();
        assert_eq!(
            server_err(&(server_max + 1).to_le_bytes()),
            DecodeError::FrameTooLarge {
                len: server_max + 1,
                max: server_max
            }
        );
    }

    #[test]
    fn frame_len_max_bounds_type_plus_payload_exactly() {
        let limits = Limits {
            frame_len_max: 1 + 16 + 1 + 3 + 2,
            ..Limits::default()
        };
        let mut at_max = Vec::new();
        let send = |body| ClientFrame::Send {
            msg_id: ID,
            to: "bob",
            body,
        };
        encode_client_frame(&send(b"ab"), &mut at_max);
        assert!(decode_client_frame(&at_max, &limits).unwrap().is_some());
        let mut over = Vec::new();
        encode_client_frame(&send(b"abc"), &mut over);
        assert_eq!(
            decode_client_frame(&over, &limits),
            Err(DecodeError::FrameTooLarge { len: 24, max: 23 })
        );
    }

    #[test]
    fn unknown_types_are_rejected_per_direction() {
        for ty in [0x00, 0x02, 0x11, 0x20, 0x7E, 0x80, 0xFF] {
            assert_eq!(client_err(&raw(ty, &[])), DecodeError::UnknownType(ty));
        }
        for ty in [0x00, 0x01, 0x10, 0x21, 0x40, 0xFF] {
            assert_eq!(server_err(&raw(ty, &[])), DecodeError::UnknownType(ty));
        }
        assert_eq!(DecodeError::UnknownType(0).error_code(), 1);
    }

    #[test]
    fn truncated_fields_are_malformed() {
        let truncated = DecodeError::Malformed(malformed::TRUNCATED);
        assert_eq!(client_err(&raw(frame_type::ACK, &[1, 2, 3, 4])), truncated);
        assert_eq!(client_err(&raw(frame_type::SEND, &ID[..15])), truncated);
        let mut send = ID.to_vec();
        send.extend_from_slice(&[5, b'b', b'o']); // str says 5 bytes, frame has 2
        assert_eq!(client_err(&raw(frame_type::SEND, &send)), truncated);
        assert_eq!(
            client_err(&raw(frame_type::HELLO, &[1, 1, b'a', 3, 0, b'x'])),
            truncated
        );
        assert_eq!(server_err(&raw(frame_type::WELCOME, &[1; 20])), truncated);
        assert_eq!(server_err(&raw(frame_type::ERROR, &[1])), truncated);
        assert_eq!(truncated.error_code(), 1);
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let trailing = DecodeError::Malformed(malformed::TRAILING);
        assert_eq!(client_err(&raw(frame_type::BYE, &[0])), trailing);
        assert_eq!(client_err(&raw(frame_type::PING, &[0; 9])), trailing);
        assert_eq!(
            client_err(&raw(frame_type::HELLO, &[1, 1, b'a', 0, 0, 9])),
            trailing
        );
        assert_eq!(server_err(&raw(frame_type::STORED, &[0; 17])), trailing);
        assert_eq!(
            server_err(&raw(frame_type::ERROR, &[1, 0, 0, b'!'])),
            trailing
        );
    }

    #[test]
    fn invalid_utf8_in_any_str_is_malformed() {
        let bad_utf8 = DecodeError::Malformed(malformed::BAD_UTF8);
        assert_eq!(
            client_err(&raw(frame_type::HELLO, &[1, 2, 0xC3, 0x28, 0, 0])),
            bad_utf8
        );
        let mut send = ID.to_vec();
        send.extend_from_slice(&[1, 0xFF, b'b', b'o', b'd', b'y']);
        assert_eq!(client_err(&raw(frame_type::SEND, &send)), bad_utf8);
        let mut rejected = ID.to_vec();
        rejected.extend_from_slice(&[1, 0, 1, 0x80]);
        assert_eq!(server_err(&raw(frame_type::REJECTED, &rejected)), bad_utf8);
        let mut deliver = vec![1, 0, 0, 0, 0, 0, 0, 0];
        deliver.extend_from_slice(&ID);
        deliver.extend_from_slice(&[1, 0xFE, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(server_err(&raw(frame_type::DELIVER, &deliver)), bad_utf8);
        assert_eq!(
            server_err(&raw(frame_type::ERROR, &[1, 0, 1, 0xC0])),
            bad_utf8
        );
    }

    #[test]
    fn token_longer_than_the_limit_is_malformed() {
        let token = vec![7u8; TOKEN_LEN_MAX_DEFAULT + 1];
        let hello = |token| ClientFrame::Hello {
            version: 1,
            user: "alice",
            token,
        };
        let mut buf = Vec::new();
        encode_client_frame(&hello(&token), &mut buf);
        assert_eq!(
            client_err(&buf),
            DecodeError::Malformed(malformed::TOKEN_TOO_LONG)
        );
        // Even when the token bytes are not all there: the limit is the answer.
        let header_only = raw(frame_type::HELLO, &[1, 1, b'a', 0xFF, 0xFF]);
        assert_eq!(
            client_err(&header_only),
            DecodeError::Malformed(malformed::TOKEN_TOO_LONG)
        );
        buf.clear();
        encode_client_frame(&hello(&token[1..]), &mut buf);
        assert!(decode_client_frame(&buf, &Limits::default())
            .unwrap()
            .is_some());
    }

    /// What the server, not the decoder, answers: ERROR 4, ERROR 1 / REJECTED 1, REJECTED 2.
    #[test]
    fn decoder_leaves_version_user_rules_and_body_limit_to_the_server() {
        let limits = Limits::default();
        let body = vec![0u8; limits.body_len_max as usize + 1];
        let frames = [
            ClientFrame::Hello {
                version: 2,
                user: "bad\nuser",
                token: b"",
            },
            ClientFrame::Send {
                msg_id: ID,
                to: "",
                body: &body,
            },
        ];
        for frame in frames {
            let mut buf = Vec::new();
            encode_client_frame(&frame, &mut buf);
            let (decoded, _) = decode_client_frame(&buf, &limits).unwrap().unwrap();
            assert_eq!(decoded, frame);
        }
    }

    #[test]
    fn largest_deliver_fits_the_server_frame_limit() {
        let limits = Limits::default();
        let from = "u".repeat(limits.user_id_len_max);
        let body = vec![1u8; limits.body_len_max as usize];
        let frame = ServerFrame::Deliver {
            seq: 1,
            msg_id: ID,
            from: &from,
            sent_ms: 1,
            body: &body,
        };
        let mut buf = Vec::new();
        encode_server_frame(&frame, &mut buf);
        assert_eq!(buf.len(), 4 + 65570);
        assert_eq!(
            decode_server_frame(&buf, &limits).unwrap().unwrap().0,
            frame
        );
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = format!("{}é and more", "r".repeat(254));
        let frame = ServerFrame::Error {
            code: 5,
            reason: &reason,
        };
        let mut buf = Vec::new();
        encode_server_frame(&frame, &mut buf);
        assert_eq!(buf.len(), encoded_len_server(&frame));
        let (decoded, _) = decode_server_frame(&buf, &Limits::default())
            .unwrap()
            .unwrap();
        let expected = "r".repeat(254); // 'é' would straddle byte 255
        assert_eq!(
            decoded,
            ServerFrame::Error {
                code: 5,
                reason: &expected
            }
        );
        assert_eq!(truncate_str("ab", 255), "ab");
        assert_eq!(truncate_str("aé", 2), "a");
    }

    #[test]
    fn error_codes_match_protocol() {
        let too_large = DecodeError::FrameTooLarge { len: 2, max: 1 };
        assert_eq!(too_large.error_code(), error_code::FRAME_TOO_LARGE);
        let malformed = DecodeError::Malformed(malformed::TRAILING);
        assert_eq!(malformed.error_code(), error_code::PROTOCOL_VIOLATION);
    }
}
