//! Sans-IO codec for MQTT 3.1.1 (OASIS Standard, 29 October 2014).
//!
//! Bytes in, packets out: nothing here touches a socket. [`decode`] borrows
//! topics, payloads and passwords from the caller's buffer; [`encode`] appends
//! to a `Vec<u8>`. [`frame_len`] reads only the fixed header, so a reader can
//! tell how many bytes the next packet needs (and reject an oversized or
//! malformed one) before its body arrives.
//!
//! Limits: a packet (fixed header included) is at most
//! [`Limits::packet_len_max`] bytes, the remaining-length varint at most 4 bytes
//! (so at most [`REMAINING_LEN_MAX`]), and a SUBSCRIBE or UNSUBSCRIBE carries at
//! most [`Limits::topics_per_subscribe_max`] topic filters. Strings and binary
//! fields are bounded by their u16 length prefix and the packet length.
//!
//! Validation is strict: each "MUST" of the spec that can be checked from the
//! bytes of one packet is a distinct [`DecodeError`] variant (spec section
//! numbers are in the variants' docs). Rules that need session state (the
//! first packet must be CONNECT, an empty client id needs clean session,
//! client id length and alphabet) are the server's to apply.
//!
//! Layout (spec chapter 2 and 3; integers big-endian):
//!
//! ```text
//! packet    = u8 (type << 4 | flags) | varint remaining_len | body
//! varint    = 1..=4 bytes, 7 bits each, least significant first, bit 7 = more
//! string    = u16 len | len bytes of UTF-8 without U+0000
//! binary    = u16 len | len bytes
//! CONNECT     string "MQTT" | u8 level 4 | u8 flags | u16 keep_alive
//!             | string client_id | [string will_topic | binary will_message]
//!             | [string username] | [binary password]
//! CONNACK     u8 session_present (bit 0) | u8 return_code
//! PUBLISH     string topic | [u16 packet_id if QoS > 0] | payload (the rest)
//! PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK    u16 packet_id
//! SUBSCRIBE   u16 packet_id | 1.. of (string filter | u8 requested QoS)
//! SUBACK      u16 packet_id | 1.. of u8 return code
//! UNSUBSCRIBE u16 packet_id | 1.. of string filter
//! PINGREQ, PINGRESP, DISCONNECT                (no body)
//! ```

use thiserror::Error;

/// Default [`Limits::packet_len_max`]: 256 KiB, fixed header included.
pub const PACKET_LEN_MAX_DEFAULT: u32 = 256 * 1024;
/// Default [`Limits::topics_per_subscribe_max`].
pub const TOPICS_PER_SUBSCRIBE_MAX_DEFAULT: usize = 16;
/// The largest remaining length a 4-byte varint carries (spec 2.2.3).
pub const REMAINING_LEN_MAX: u32 = 268_435_455;
/// The longest fixed header: the type/flags byte and a 4-byte varint.
pub const FIXED_HEADER_LEN_MAX: usize = 5;
/// The protocol name CONNECT must carry (spec 3.1.2.1).
pub const PROTOCOL_NAME: &str = "MQTT";
/// The protocol level of MQTT 3.1.1 (spec 3.1.2.2); the only one we speak.
pub const PROTOCOL_LEVEL: u8 = 4;

/// Bounds the decoder enforces. A server can configure them; a test can shrink
/// one to reach its edge cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Max bytes of a whole packet, fixed header included. Checked from the
    /// fixed header alone, before the body arrives.
    pub packet_len_max: u32,
    /// Max topic filters in one SUBSCRIBE or UNSUBSCRIBE.
    pub topics_per_subscribe_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            packet_len_max: PACKET_LEN_MAX_DEFAULT,
            topics_per_subscribe_max: TOPICS_PER_SUBSCRIBE_MAX_DEFAULT,
        }
    }
}

/// The control packet types (the high nibble of the first byte; spec 2.2.1).
/// 0 and 15 are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
}

impl PacketType {
    /// The type with this number, or None for the reserved 0 and 15 (and >15).
    pub fn from_u8(value: u8) -> Option<Self> {
        use PacketType::*;
        Some(match value {
            1 => Connect,
            2 => ConnAck,
            3 => Publish,
            4 => PubAck,
            5 => PubRec,
            6 => PubRel,
            7 => PubComp,
            8 => Subscribe,
            9 => SubAck,
            10 => Unsubscribe,
            11 => UnsubAck,
            12 => PingReq,
            13 => PingResp,
            14 => Disconnect,
            _ => return None,
        })
    }

    /// The fixed-header flags this type must carry (spec 2.2.2), or None for
    /// PUBLISH, whose flags are DUP, QoS and RETAIN.
    pub fn required_flags(self) -> Option<u8> {
        match self {
            PacketType::Publish => None,
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => Some(0b0010),
            _ => Some(0),
        }
    }

    /// True for the types whose remaining length must be 0.
    fn has_no_body(self) -> bool {
        matches!(
            self,
            PacketType::PingReq | PacketType::PingResp | PacketType::Disconnect
        )
    }
}

/// Quality of service of a PUBLISH, a will or a subscription (spec 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS with this number, or None for 3 and above.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The CONNACK return code (spec 3.2.2.3). 6..=255 are reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectReturnCode {
    /// Connection accepted.
    Accepted = 0,
    /// The server does not support the protocol level the client asked for.
    UnacceptableProtocolVersion = 1,
    /// The client id is well-formed UTF-8 but not allowed by the server.
    IdentifierRejected = 2,
    /// The network connection is up but the MQTT service is not.
    ServerUnavailable = 3,
    /// The user name or password is malformed.
    BadUserNameOrPassword = 4,
    /// The client is not authorized to connect.
    NotAuthorized = 5,
}

impl ConnectReturnCode {
    /// The code with this number, or None for the reserved 6..=255.
    pub fn from_u8(value: u8) -> Option<Self> {
        use ConnectReturnCode::*;
        Some(match value {
            0 => Accepted,
            1 => UnacceptableProtocolVersion,
            2 => IdentifierRejected,
            3 => ServerUnavailable,
            4 => BadUserNameOrPassword,
            5 => NotAuthorized,
            _ => return None,
        })
    }
}

/// One SUBACK return code (spec 3.9.3): the QoS granted, or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubAckReturnCode {
    /// 0x00, 0x01 or 0x02: subscribed, with this maximum QoS.
    Success(QoS),
    /// 0x80: the subscription was refused.
    Failure,
}

impl SubAckReturnCode {
    /// The wire byte of a failure.
    pub const FAILURE: u8 = 0x80;

    /// The code this byte stands for, or None for the reserved values.
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            Self::FAILURE => Some(SubAckReturnCode::Failure),
            _ => QoS::from_u8(value).map(SubAckReturnCode::Success),
        }
    }

    /// The wire byte: 0x00, 0x01, 0x02 or 0x80.
    pub fn to_u8(self) -> u8 {
        match self {
            SubAckReturnCode::Success(qos) => qos as u8,
            SubAckReturnCode::Failure => Self::FAILURE,
        }
    }
}

/// The will message of a CONNECT, published by the server if the client goes
/// away without a DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    /// A topic name: non-empty, no wildcards.
    pub topic: &'a str,
    pub message: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

/// CONNECT (client to server, first packet). The protocol name and level are
/// not stored: decode accepts only "MQTT" level 4 and encode writes those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub clean_session: bool,
    /// Seconds; 0 turns keep-alive off.
    pub keep_alive: u16,
    /// May be empty (then the server must require `clean_session`).
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    /// Only with a `username` (spec 3.1.2.9).
    pub password: Option<&'a [u8]>,
}

/// CONNACK (server to client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Must be false unless `code` is [`ConnectReturnCode::Accepted`].
    pub session_present: bool,
    pub code: ConnectReturnCode,
}

/// PUBLISH (either direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// Redelivery; never set at QoS 0.
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// A topic name: non-empty, no wildcards.
    pub topic: &'a str,
    /// Non-zero at QoS 1 and 2; 0 at QoS 0, where it is not on the wire.
    pub packet_id: u16,
    pub payload: &'a [u8],
}

/// One topic filter of a SUBSCRIBE and the maximum QoS asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subscription<'a> {
    /// A topic filter: non-empty, `+` and `#` only as whole levels, `#` last.
    pub filter: &'a str,
    pub qos: QoS,
}

/// SUBSCRIBE (client to server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe<'a> {
    pub packet_id: u16,
    /// 1..=[`Limits::topics_per_subscribe_max`] entries.
    pub filters: Vec<Subscription<'a>>,
}

/// SUBACK (server to client): one return code per filter of the SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    /// At least one.
    pub return_codes: Vec<SubAckReturnCode>,
}

/// UNSUBSCRIBE (client to server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe<'a> {
    pub packet_id: u16,
    /// 1..=[`Limits::topics_per_subscribe_max`] topic filters.
    pub filters: Vec<&'a str>,
}

/// One MQTT 3.1.1 control packet, borrowing its strings and bytes from the
/// buffer it was decoded from. Packet identifiers are never 0 in a packet
/// [`decode`] returns (spec 2.3.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck(ConnAck),
    Publish(Publish<'a>),
    PubAck { packet_id: u16 },
    PubRec { packet_id: u16 },
    PubRel { packet_id: u16 },
    PubComp { packet_id: u16 },
    Subscribe(Subscribe<'a>),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe<'a>),
    UnsubAck { packet_id: u16 },
    PingReq,
    PingResp,
    Disconnect,
}

impl Packet<'_> {
    /// The control packet type of this packet.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck { .. } => PacketType::PubAck,
            Packet::PubRec { .. } => PacketType::PubRec,
            Packet::PubRel { .. } => PacketType::PubRel,
            Packet::PubComp { .. } => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck { .. } => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect => PacketType::Disconnect,
        }
    }
}

/// Why bytes are not a valid MQTT 3.1.1 packet. Every one is a protocol
/// violation: the spec has the receiver close the connection (after a CONNACK
/// with code 1 for [`DecodeError::UnacceptableProtocolLevel`]; see
/// [`DecodeError::connack_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Packet type 0 or 15 (spec 2.2.1).
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    /// Fixed-header flags other than the ones the type requires (spec 2.2.2).
    #[error("{packet_type:?} with reserved fixed-header flags {flags:#06b}")]
    InvalidFlags { packet_type: PacketType, flags: u8 },
    /// PUBLISH with both QoS bits set (spec 3.3.1.2).
    #[error("PUBLISH with QoS 3")]
    InvalidPublishQos,
    /// PUBLISH with DUP set at QoS 0 (spec 3.3.1.1).
    #[error("PUBLISH with DUP set at QoS 0")]
    DupWithQos0,
    /// The remaining-length varint has a continuation bit on its 4th byte
    /// (spec 2.2.3).
    #[error("remaining length longer than 4 bytes")]
    RemainingLengthTooLong,
    /// The fixed header announces a packet over [`Limits::packet_len_max`].
    #[error("packet of {len} bytes exceeds the limit of {max}")]
    PacketTooLarge { len: usize, max: u32 },
    /// PINGREQ, PINGRESP or DISCONNECT with a non-zero remaining length
    /// (spec 3.12, 3.13, 3.14).
    #[error("{0:?} must have remaining length 0")]
    UnexpectedBody(PacketType),
    /// The remaining length ends inside a field.
    #[error("{0:?} ends inside a field")]
    Truncated(PacketType),
    /// Bytes left inside the packet after its last field.
    #[error("{0:?} has bytes after its last field")]
    TrailingBytes(PacketType),
    /// A string that is not well-formed UTF-8 (spec 1.5.3).
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A string containing U+0000 (spec 1.5.3).
    #[error("string contains U+0000")]
    NullCharacter,
    /// CONNECT whose protocol name is not "MQTT" (spec 3.1.2.1).
    #[error("CONNECT protocol name is not \"MQTT\"")]
    InvalidProtocolName,
    /// CONNECT with a protocol level other than 4 (spec 3.1.2.2): answer
    /// CONNACK code 1, then close.
    #[error("CONNECT protocol level {0}, only 4 (MQTT 3.1.1) is supported")]
    UnacceptableProtocolLevel(u8),
    /// CONNECT with the reserved flag (bit 0) set (spec 3.1.2.3).
    #[error("CONNECT with the reserved flag set")]
    ConnectReservedFlag,
    /// CONNECT with will QoS or will retain but no will flag (spec 3.1.2.6/7).
    #[error("CONNECT with will QoS or will retain but no will flag")]
    WillFlagsWithoutWill,
    /// CONNECT with will QoS 3 (spec 3.1.2.6).
    #[error("CONNECT with will QoS 3")]
    InvalidWillQos,
    /// CONNECT with the password flag but not the user name flag (spec 3.1.2.9).
    #[error("CONNECT with a password but no user name")]
    PasswordWithoutUsername,
    /// CONNACK with a reserved bit of its flags byte set (spec 3.2.2.1).
    #[error("CONNACK with reserved flags {0:#04x}")]
    InvalidConnAckFlags(u8),
    /// CONNACK with a reserved return code, 6..=255 (spec 3.2.2.3).
    #[error("CONNACK with reserved return code {0}")]
    InvalidConnectReturnCode(u8),
    /// CONNACK refusing the connection but with session present (spec 3.2.2.2).
    #[error("CONNACK with session present and a non-zero return code")]
    SessionPresentOnRefusal,
    /// Packet identifier 0 (spec 2.3.1).
    #[error("{0:?} with packet identifier 0")]
    ZeroPacketId(PacketType),
    /// An empty topic name or topic filter (spec 4.7.3).
    #[error("empty topic")]
    EmptyTopic,
    /// A topic name (PUBLISH, will) with `+` or `#` (spec 3.3.2.1, 4.7.1).
    #[error("wildcard in a topic name")]
    WildcardInTopicName,
    /// A topic filter with `+` or `#` not alone in its level, or `#` not last
    /// (spec 4.7.1.2, 4.7.1.3).
    #[error("misplaced wildcard in a topic filter")]
    InvalidTopicFilter,
    /// SUBSCRIBE or UNSUBSCRIBE without topic filters (spec 3.8.3, 3.10.3).
    #[error("{0:?} without topic filters")]
    NoTopicFilters(PacketType),
    /// SUBSCRIBE or UNSUBSCRIBE with more than
    /// [`Limits::topics_per_subscribe_max`] topic filters.
    #[error("more than {max} topic filters")]
    TooManyTopicFilters { max: usize },
    /// SUBSCRIBE asking for QoS 3 (spec 3.8.3.1).
    #[error("SUBSCRIBE requesting QoS 3")]
    InvalidRequestedQos,
    /// SUBSCRIBE with reserved bits 2..=7 of an options byte set (spec 3.8.3.1).
    #[error("SUBSCRIBE options byte {0:#04x} has reserved bits set")]
    SubscribeReservedBits(u8),
    /// SUBACK without return codes (spec 3.9.3).
    #[error("SUBACK without return codes")]
    NoReturnCodes,
    /// SUBACK with a return code other than 0x00, 0x01, 0x02, 0x80 (spec 3.9.3).
    #[error("SUBACK with reserved return code {0:#04x}")]
    InvalidSubAckReturnCode(u8),
}

impl DecodeError {
    /// The CONNACK code to send before closing, if the spec asks for one: a
    /// CONNECT with a protocol level we do not speak gets code 1 (spec
    /// 3.1.2.2). Every other error closes the connection without a CONNACK.
    pub fn connack_code(&self) -> Option<ConnectReturnCode> {
        match self {
            DecodeError::UnacceptableProtocolLevel(_) => {
                Some(ConnectReturnCode::UnacceptableProtocolVersion)
            }
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// A parsed fixed header.
struct FixedHeader {
    packet_type: PacketType,
    flags: u8,
    /// Bytes of the fixed header itself (2..=5).
    header_len: usize,
    remaining_len: usize,
}

/// Parses the fixed header at the start of `buf`: Ok(None) until all of it
/// is there. Checks everything the header alone can tell: the type, its flags,
/// the varint, the packet size and the types that must have no body.
fn fixed_header(buf: &[u8], limits: &Limits) -> Result<Option<FixedHeader>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let packet_type =
        PacketType::from_u8(first >> 4).ok_or(DecodeError::ReservedPacketType(first >> 4))?;
    let flags = first & 0x0F;
    match packet_type.required_flags() {
        Some(required) if flags != required => {
            return Err(DecodeError::InvalidFlags { packet_type, flags });
        }
        Some(_) => {}
        None => {
            // PUBLISH: bit 3 DUP, bits 2-1 QoS, bit 0 RETAIN.
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::InvalidPublishQos);
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::DupWithQos0);
            }
        }
    }

    // The remaining length: up to 4 bytes of 7 bits, least significant first.
    let mut remaining_len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining_len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 != 0 {
            continue;
        }
        let header_len = 2 + i;
        let len = header_len + remaining_len;
        // u32 fits in usize on every target this server runs on.
        if len > limits.packet_len_max as usize {
            return Err(DecodeError::PacketTooLarge {
                len,
                max: limits.packet_len_max,
            });
        }
        if packet_type.has_no_body() && remaining_len != 0 {
            return Err(DecodeError::UnexpectedBody(packet_type));
        }
        return Ok(Some(FixedHeader {
            packet_type,
            flags,
            header_len,
            remaining_len,
        }));
    }
    Err(DecodeError::RemainingLengthTooLong)
}

/// The length of the packet at the start of `buf` (fixed header included),
/// read from the fixed header alone: Ok(None) while the fixed header is
/// incomplete. The body is not looked at, so a later [`decode`] of the whole
/// packet can still fail; but an error here is the error [`decode`] gives.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, DecodeError> {
    Ok(fixed_header(buf, limits)?.map(|h| h.header_len + h.remaining_len))
}

/// Decodes the packet at the start of `buf`. Ok(None): not all of it is there
/// yet (read more and call again with the longer buffer); Ok(Some((packet,
/// consumed))): the packet and the bytes it took (`consumed <= buf.len()`).
/// An error is a protocol violation: the connection cannot be resynchronised.
pub fn decode<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Packet<'a>, usize)>, DecodeError> {
    let Some(header) = fixed_header(buf, limits)? else {
        return Ok(None);
    };
    let len = header.header_len + header.remaining_len;
    let Some(body) = buf.get(header.header_len..len) else {
        return Ok(None);
    };
    let mut r = Reader {
        buf: body,
        packet_type: header.packet_type,
    };
    let packet = match header.packet_type {
        PacketType::Connect => Packet::Connect(decode_connect(&mut r)?),
        PacketType::ConnAck => Packet::ConnAck(decode_connack(&mut r)?),
        PacketType::Publish => Packet::Publish(decode_publish(&mut r, header.flags)?),
        PacketType::PubAck => Packet::PubAck {
            packet_id: r.packet_id()?,
        },
        PacketType::PubRec => Packet::PubRec {
            packet_id: r.packet_id()?,
        },
        PacketType::PubRel => Packet::PubRel {
            packet_id: r.packet_id()?,
        },
        PacketType::PubComp => Packet::PubComp {
            packet_id: r.packet_id()?,
        },
        PacketType::Subscribe => Packet::Subscribe(decode_subscribe(&mut r, limits)?),
        PacketType::SubAck => Packet::SubAck(decode_suback(&mut r)?),
        PacketType::Unsubscribe => Packet::Unsubscribe(decode_unsubscribe(&mut r, limits)?),
        PacketType::UnsubAck => Packet::UnsubAck {
            packet_id: r.packet_id()?,
        },
        PacketType::PingReq => Packet::PingReq,
        PacketType::PingResp => Packet::PingResp,
        PacketType::Disconnect => Packet::Disconnect,
    };
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes(header.packet_type));
    }
    Ok(Some((packet, len)))
}

/// A cursor over the body of one packet; running out of bytes is
/// [`DecodeError::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    packet_type: PacketType,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated(self.packet_type));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A packet identifier: non-zero (spec 2.3.1).
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId(self.packet_type)),
            id => Ok(id),
        }
    }

    /// Binary data: a u16 length and that many bytes (spec 1.5.3 layout).
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string: well-formed, without U+0000 (spec 1.5.3).
    /// (Rust's UTF-8 check already rejects surrogates and overlong forms.)
    fn string(&mut self) -> Result<&'a str, DecodeError> {
        let s = std::str::from_utf8(self.binary()?).map_err(|_| DecodeError::InvalidUtf8)?;
        if s.contains('\0') {
            return Err(DecodeError::NullCharacter);
        }
        Ok(s)
    }

    /// Everything left in the packet.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// A topic name (PUBLISH, will): non-empty, no wildcards (spec 4.7).
fn topic_name(topic: &str) -> Result<&str, DecodeError> {
    if topic.is_empty() {
        return Err(DecodeError::EmptyTopic);
    }
    if topic.contains(['+', '#']) {
        return Err(DecodeError::WildcardInTopicName);
    }
    Ok(topic)
}

/// A topic filter (SUBSCRIBE, UNSUBSCRIBE): non-empty; `+` only as a whole
/// level; `#` only as a whole level and the last one (spec 4.7.1).
fn topic_filter(filter: &str) -> Result<&str, DecodeError> {
    if filter.is_empty() {
        return Err(DecodeError::EmptyTopic);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let valid = match level {
            "+" => true,
            "#" => levels.peek().is_none(),
            _ => !level.contains(['+', '#']),
        };
        if !valid {
            return Err(DecodeError::InvalidTopicFilter);
        }
    }
    Ok(filter)
}

// CONNECT flag bits (spec 3.1.2.3).
const CONNECT_RESERVED: u8 = 0b0000_0001;
const CONNECT_CLEAN_SESSION: u8 = 0b0000_0010;
const CONNECT_WILL: u8 = 0b0000_0100;
const CONNECT_WILL_QOS_SHIFT: u8 = 3;
const CONNECT_WILL_QOS: u8 = 0b0001_1000;
const CONNECT_WILL_RETAIN: u8 = 0b0010_0000;
const CONNECT_PASSWORD: u8 = 0b0100_0000;
const CONNECT_USERNAME: u8 = 0b1000_0000;

fn decode_connect<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    // Compared as bytes: a name that is not even UTF-8 is still just "not MQTT".
    if r.binary()? != PROTOCOL_NAME.as_bytes() {
        return Err(DecodeError::InvalidProtocolName);
    }
    // The level comes before the flags: another protocol version may use
    // them differently, and it must get CONNACK 1 rather than a flag error.
    let level = r.u8()?;
    if level != PROTOCOL_LEVEL {
        return Err(DecodeError::UnacceptableProtocolLevel(level));
    }
    let flags = r.u8()?;
    if flags & CONNECT_RESERVED != 0 {
        return Err(DecodeError::ConnectReservedFlag);
    }
    let has_will = flags & CONNECT_WILL != 0;
    let will_qos = (flags & CONNECT_WILL_QOS) >> CONNECT_WILL_QOS_SHIFT;
    let will_retain = flags & CONNECT_WILL_RETAIN != 0;
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidWillQos)?;
    let has_username = flags & CONNECT_USERNAME != 0;
    let has_password = flags & CONNECT_PASSWORD != 0;
    if has_password && !has_username {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = r.u16()?;

    // The payload, in this order (spec 3.1.3).
    let client_id = r.string()?;
    let will = if has_will {
        Some(Will {
            topic: topic_name(r.string()?)?,
            message: r.binary()?,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        clean_session: flags & CONNECT_CLEAN_SESSION != 0,
        keep_alive,
        client_id,
        will,
        username,
        password,
    })
}

fn decode_connack(r: &mut Reader<'_>) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & !1 != 0 {
        return Err(DecodeError::InvalidConnAckFlags(flags));
    }
    let code = r.u8()?;
    let code =
        ConnectReturnCode::from_u8(code).ok_or(DecodeError::InvalidConnectReturnCode(code))?;
    let session_present = flags == 1;
    if session_present && code != ConnectReturnCode::Accepted {
        return Err(DecodeError::SessionPresentOnRefusal);
    }
    Ok(ConnAck {
        session_present,
        code,
    })
}

fn decode_publish<'a>(r: &mut Reader<'a>, flags: u8) -> Result<Publish<'a>, DecodeError> {
    // The fixed header already rejected QoS 3 and DUP at QoS 0.
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::InvalidPublishQos)?;
    let topic = topic_name(r.string()?)?;
    let packet_id = match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce | QoS::ExactlyOnce => r.packet_id()?,
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 0b0001 != 0,
        topic,
        packet_id,
        payload: r.rest(),
    })
}

fn decode_subscribe<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<Subscribe<'a>, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        // Checked before reading the next one, so the Vec stays bounded.
        if filters.len() == limits.topics_per_subscribe_max {
            return Err(DecodeError::TooManyTopicFilters {
                max: limits.topics_per_subscribe_max,
            });
        }
        let filter = topic_filter(r.string()?)?;
        let options = r.u8()?;
        if options & !0b11 != 0 {
            return Err(DecodeError::SubscribeReservedBits(options));
        }
        let qos = QoS::from_u8(options).ok_or(DecodeError::InvalidRequestedQos)?;
        filters.push(Subscription { filter, qos });
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe { packet_id, filters })
}

fn decode_suback(r: &mut Reader<'_>) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let return_codes = r
        .rest()
        .iter()
        .map(|&code| {
            SubAckReturnCode::from_u8(code).ok_or(DecodeError::InvalidSubAckReturnCode(code))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if return_codes.is_empty() {
        return Err(DecodeError::NoReturnCodes);
    }
    Ok(SubAck {
        packet_id,
        return_codes,
    })
}

fn decode_unsubscribe<'a>(
    r: &mut Reader<'a>,
    limits: &Limits,
) -> Result<Unsubscribe<'a>, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut filters = Vec::new();
    while !r.buf.is_empty() {
        if filters.len() == limits.topics_per_subscribe_max {
            return Err(DecodeError::TooManyTopicFilters {
                max: limits.topics_per_subscribe_max,
            });
        }
        filters.push(topic_filter(r.string()?)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe { packet_id, filters })
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Bytes of a string or binary field: the u16 length and the data.
fn field_len(data: &[u8]) -> usize {
    2 + data.len()
}

/// The remaining length of `p`: everything after the fixed header.
fn remaining_len(p: &Packet<'_>) -> usize {
    match p {
        Packet::Connect(c) => {
            // Protocol name, level, flags, keep alive.
            let mut len = field_len(PROTOCOL_NAME.as_bytes()) + 1 + 1 + 2;
            len += field_len(c.client_id.as_bytes());
            if let Some(will) = &c.will {
                len += field_len(will.topic.as_bytes()) + field_len(will.message);
            }
            len += c.username.map_or(0, |u| field_len(u.as_bytes()));
            len += c.password.map_or(0, field_len);
            len
        }
        Packet::ConnAck(_)
        | Packet::PubAck { .. }
        | Packet::PubRec { .. }
        | Packet::PubRel { .. }
        | Packet::PubComp { .. }
        | Packet::UnsubAck { .. } => 2,
        Packet::Publish(p) => {
            let packet_id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
            field_len(p.topic.as_bytes()) + packet_id + p.payload.len()
        }
        Packet::Subscribe(s) => {
            let filters: usize = s
                .filters
                .iter()
                .map(|f| field_len(f.filter.as_bytes()) + 1)
                .sum();
            2 + filters
        }
        Packet::SubAck(s) => 2 + s.return_codes.len(),
        Packet::Unsubscribe(u) => {
            let filters: usize = u.filters.iter().map(|f| field_len(f.as_bytes())).sum();
            2 + filters
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => 0,
    }
}

/// Bytes of the remaining-length varint for `len`.
fn varint_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The bytes [`encode`] appends for `p`.
pub fn encoded_len(p: &Packet<'_>) -> usize {
    let remaining = remaining_len(p);
    1 + varint_len(remaining) + remaining
}

/// Appends the remaining-length varint (spec 2.2.3, the encoding algorithm).
fn put_varint(out: &mut Vec<u8>, mut len: usize) {
    assert!(
        len <= REMAINING_LEN_MAX as usize,
        "MQTT packet body of {len} bytes exceeds the {REMAINING_LEN_MAX} the varint carries"
    );
    loop {
        // The low 7 bits; the mask makes the cast lossless.
        let mut byte = (len & 0x7F) as u8;
        len >>= 7;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a string or binary field: u16 length, then the bytes.
fn put_field(out: &mut Vec<u8>, data: &[u8]) {
    let len = u16::try_from(data.len())
        .unwrap_or_else(|_| panic!("MQTT field of {} bytes exceeds 65535", data.len()));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// The first byte: the type in the high nibble, the flags in the low one.
fn first_byte(p: &Packet<'_>) -> u8 {
    let packet_type = p.packet_type();
    let flags = match p {
        Packet::Publish(p) => u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        _ => packet_type.required_flags().unwrap_or(0),
    };
    (packet_type as u8) << 4 | flags
}

/// Appends the wire form of `p` to `out` ([`encoded_len`] bytes).
///
/// Encoding does not validate: a packet [`decode`] would reject (packet id 0,
/// a wildcard in a topic name, a password without a user name, DUP at QoS 0,
/// no topic filters...) encodes to bytes [`decode`] rejects. Every packet
/// [`decode`] returns re-encodes to one that decodes to the same packet.
///
/// # Panics
///
/// If a string or binary field is longer than 65535 bytes, or the packet body
/// longer than [`REMAINING_LEN_MAX`]: those cannot be represented at all.
pub fn encode(p: &Packet<'_>, out: &mut Vec<u8>) {
    let remaining = remaining_len(p);
    out.reserve(1 + varint_len(remaining) + remaining);
    out.push(first_byte(p));
    put_varint(out, remaining);
    match p {
        Packet::Connect(c) => {
            put_field(out, PROTOCOL_NAME.as_bytes());
            out.push(PROTOCOL_LEVEL);
            let mut flags = 0;
            if c.clean_session {
                flags |= CONNECT_CLEAN_SESSION;
            }
            if let Some(will) = &c.will {
                flags |= CONNECT_WILL | (will.qos as u8) << CONNECT_WILL_QOS_SHIFT;
                if will.retain {
                    flags |= CONNECT_WILL_RETAIN;
                }
            }
            if c.username.is_some() {
                flags |= CONNECT_USERNAME;
            }
            if c.password.is_some() {
                flags |= CONNECT_PASSWORD;
            }
            out.push(flags);
            out.extend_from_slice(&c.keep_alive.to_be_bytes());
            put_field(out, c.client_id.as_bytes());
            if let Some(will) = &c.will {
                put_field(out, will.topic.as_bytes());
                put_field(out, will.message);
            }
            if let Some(username) = c.username {
                put_field(out, username.as_bytes());
            }
            if let Some(password) = c.password {
                put_field(out, password);
            }
        }
        Packet::ConnAck(c) => {
            out.push(u8::from(c.session_present));
            out.push(c.code as u8);
        }
        Packet::Publish(p) => {
            put_field(out, p.topic.as_bytes());
            if p.qos != QoS::AtMostOnce {
                out.extend_from_slice(&p.packet_id.to_be_bytes());
            }
            out.extend_from_slice(p.payload);
        }
        Packet::PubAck { packet_id }
        | Packet::PubRec { packet_id }
        | Packet::PubRel { packet_id }
        | Packet::PubComp { packet_id }
        | Packet::UnsubAck { packet_id } => out.extend_from_slice(&packet_id.to_be_bytes()),
        Packet::Subscribe(s) => {
            out.extend_from_slice(&s.packet_id.to_be_bytes());
            for f in &s.filters {
                put_field(out, f.filter.as_bytes());
                out.push(f.qos as u8);
            }
        }
        Packet::SubAck(s) => {
            out.extend_from_slice(&s.packet_id.to_be_bytes());
            out.extend(s.return_codes.iter().map(|c| c.to_u8()));
        }
        Packet::Unsubscribe(u) => {
            out.extend_from_slice(&u.packet_id.to_be_bytes());
            for f in &u.filters {
                put_field(out, f.as_bytes());
            }
        }
        Packet::PingReq | Packet::PingResp | Packet::Disconnect => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    /// Decodes `bytes`, which must hold exactly one whole packet.
    fn decode_all(bytes: &[u8]) -> Result<Packet<'_>, DecodeError> {
        let (packet, consumed) = decode(bytes, &limits())?.expect("a whole packet");
        assert_eq!(consumed, bytes.len());
        Ok(packet)
    }

    fn encoded(p: &Packet<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(p, &mut out);
        assert_eq!(out.len(), encoded_len(p));
        out
    }

    /// A packet with the given first byte and body (remaining length < 128).
    fn raw(first: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        let mut out = vec![first, body.len() as u8];
        out.extend_from_slice(body);
        out
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    /// A CONNECT body: protocol name, level, flags, keep alive 60, then `payload`.
    fn connect_body(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = string(name);
        body.extend_from_slice(&[level, flags, 0, 60]);
        body.extend_from_slice(payload);
        body
    }

    fn connect_err(flags: u8, payload: &[u8]) -> DecodeError {
        decode_all(&raw(0x10, &connect_body(b"MQTT", 4, flags, payload))).unwrap_err()
    }

    fn publish_with_topic(topic: &[u8]) -> Vec<u8> {
        let mut body = string(topic);
        body.extend_from_slice(b"payload");
        raw(0x30, &body)
    }

    fn subscribe(body_after_id: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 10];
        body.extend_from_slice(body_after_id);
        raw(0x82, &body)
    }

    // --- Spec examples -----------------------------------------------------

    /// Spec 2.2.3, table 2.4: the bounds of each varint length.
    #[test]
    fn remaining_length_table() {
        let table: [(usize, &[u8]); 8] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_151, &[0xFF, 0xFF, 0x7F]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (268_435_455, &[0xFF, 0xFF, 0xFF, 0x7F]),
        ];
        let unlimited = Limits {
            packet_len_max: u32::MAX,
            ..Limits::default()
        };
        for (len, bytes) in table {
            let mut out = Vec::new();
            put_varint(&mut out, len);
            assert_eq!(out, bytes, "encoding {len}");
            assert_eq!(varint_len(len), bytes.len());
            // Decoded from a PUBLISH fixed header: the body is not needed.
            let mut header = vec![0x30];
            header.extend_from_slice(bytes);
            let total = header.len() + len;
            assert_eq!(frame_len(&header, &unlimited), Ok(Some(total)), "{len}");
            // Every proper prefix of the header needs more bytes.
            for cut in 0..header.len() {
                assert_eq!(frame_len(&header[..cut], &unlimited), Ok(None));
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn encode_rejects_a_body_the_varint_cannot_carry() {
        put_varint(&mut Vec::new(), REMAINING_LEN_MAX as usize + 1);
    }

    /// A non-minimal varint is not forbidden by 3.1.1; it is read as its value.
    #[test]
    fn non_minimal_remaining_length_is_accepted() {
        assert_eq!(
            decode(&[0xC0, 0x80, 0x00], &limits()),
            Ok(Some((Packet::PingReq, 3)))
        );
    }

    /// Spec 3.1.2.10, figure 3.6: the variable header of a CONNECT with flags
    /// 0xCE (user name, password, will QoS 1, will, clean session), keep alive 10.
    #[test]
    fn spec_connect_example() {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xCE, 0, 10];
        for field in [&b"client"[..], b"will/topic", b"bye", b"user", b"pass"] {
            body.extend_from_slice(&string(field));
        }
        let bytes = raw(0x10, &body);
        let expected = Packet::Connect(Connect {
            clean_session: true,
            keep_alive: 10,
            client_id: "client",
            will: Some(Will {
                topic: "will/topic",
                message: b"bye",
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            username: Some("user"),
            password: Some(b"pass"),
        });
        assert_eq!(decode_all(&bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);
    }

    /// Spec 3.3.2.3, figure 3.11: PUBLISH "a/b", packet id 10, QoS 1.
    #[test]
    fn spec_publish_example() {
        let bytes = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 10, b'h', b'i'];
        let expected = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "a/b",
            packet_id: 10,
            payload: b"hi",
        });
        assert_eq!(decode_all(&bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);
    }

    /// Spec 3.8.3, figure 3.22 and 3.9.3, figure 3.26: SUBSCRIBE "a/b" QoS 1,
    /// "c/d" QoS 2; a SUBACK granting QoS 0, QoS 2 and a failure.
    #[test]
    fn spec_subscribe_and_suback_examples() {
        let bytes = [
            0x82, 14, 0, 10, 0, 3, b'a', b'/', b'b', 1, 0, 3, b'c', b'/', b'd', 2,
        ];
        let expected = Packet::Subscribe(Subscribe {
            packet_id: 10,
            filters: vec![
                Subscription {
                    filter: "a/b",
                    qos: QoS::AtLeastOnce,
                },
                Subscription {
                    filter: "c/d",
                    qos: QoS::ExactlyOnce,
                },
            ],
        });
        assert_eq!(decode_all(&bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);

        let bytes = [0x90, 5, 0, 10, 0x00, 0x02, 0x80];
        let expected = Packet::SubAck(SubAck {
            packet_id: 10,
            return_codes: vec![
                SubAckReturnCode::Success(QoS::AtMostOnce),
                SubAckReturnCode::Success(QoS::ExactlyOnce),
                SubAckReturnCode::Failure,
            ],
        });
        assert_eq!(decode_all(&bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);
    }

    /// Spec 3.10.3, figure 3.30: UNSUBSCRIBE "a/b", "c/d".
    #[test]
    fn spec_unsubscribe_example() {
        let bytes = [
            0xA2, 12, 0, 10, 0, 3, b'a', b'/', b'b', 0, 3, b'c', b'/', b'd',
        ];
        let expected = Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            filters: vec!["a/b", "c/d"],
        });
        assert_eq!(decode_all(&bytes), Ok(expected.clone()));
        assert_eq!(encoded(&expected), bytes);
    }

    #[test]
    fn fixed_size_packets_have_their_spec_bytes() {
        let cases: [(Packet<'_>, &[u8]); 9] = [
            (
                Packet::ConnAck(ConnAck {
                    session_present: true,
                    code: ConnectReturnCode::Accepted,
                }),
                &[0x20, 2, 1, 0],
            ),
            (
                Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ConnectReturnCode::NotAuthorized,
                }),
                &[0x20, 2, 0, 5],
            ),
            (Packet::PubAck { packet_id: 0x1234 }, &[0x40, 2, 0x12, 0x34]),
            (Packet::PubRec { packet_id: 1 }, &[0x50, 2, 0, 1]),
            (Packet::PubRel { packet_id: 1 }, &[0x62, 2, 0, 1]),
            (Packet::PubComp { packet_id: 1 }, &[0x70, 2, 0, 1]),
            (Packet::UnsubAck { packet_id: 1 }, &[0xB0, 2, 0, 1]),
            (Packet::PingReq, &[0xC0, 0]),
            (Packet::Disconnect, &[0xE0, 0]),
        ];
        for (packet, bytes) in cases {
            assert_eq!(encoded(&packet), bytes);
            assert_eq!(decode_all(bytes), Ok(packet));
        }
        assert_eq!(decode_all(&[0xD0, 0]), Ok(Packet::PingResp));
    }

    /// Spec 4.7.1, 4.7.3: the topic filter examples.
    #[test]
    fn topic_filter_examples() {
        for valid in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "sport/tennis/#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "+/+",
            "/+",
            "/finance",
            "sport/",
            "/",
        ] {
            assert_eq!(topic_filter(valid), Ok(valid));
        }
        for invalid in [
            "sport/tennis#",
            "sport/tennis/#/ranking",
            "sport+",
            "#/",
            "a/b+",
        ] {
            assert_eq!(topic_filter(invalid), Err(DecodeError::InvalidTopicFilter));
        }
        assert_eq!(topic_filter(""), Err(DecodeError::EmptyTopic));
        // Topic names may have empty levels and spaces, not wildcards.
        assert_eq!(topic_name("/ a //"), Ok("/ a //"));
    }

    // --- Incremental decoding and limits -------------------------------------

    #[test]
    fn every_proper_prefix_needs_more() {
        let p = Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "t",
            packet_id: 7,
            payload: &[0xAB; 200],
        });
        let bytes = encoded(&p);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], &limits()), Ok(None), "cut {cut}");
        }
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(decode(&two, &limits()), Ok(Some((p, bytes.len()))));
    }

    #[test]
    fn packet_too_large_from_the_fixed_header_alone() {
        let small = Limits {
            packet_len_max: 100,
            ..Limits::default()
        };
        // 2 + 98 = 100 bytes is allowed; 2 + 99 is not, with no body present.
        assert_eq!(frame_len(&[0x30, 98], &small), Ok(Some(100)));
        let err = DecodeError::PacketTooLarge { len: 101, max: 100 };
        assert_eq!(frame_len(&[0x30, 99], &small), Err(err));
        assert_eq!(decode(&[0x30, 99], &small), Err(err));
        // The default limit: 256 KiB including the 4-byte header.
        let mut header = vec![0x30];
        put_varint(&mut header, PACKET_LEN_MAX_DEFAULT as usize - 4 + 1);
        assert_eq!(
            decode(&header, &limits()),
            Err(DecodeError::PacketTooLarge {
                len: PACKET_LEN_MAX_DEFAULT as usize + 1,
                max: PACKET_LEN_MAX_DEFAULT
            })
        );
    }

    #[test]
    fn remaining_length_of_five_bytes() {
        let err = DecodeError::RemainingLengthTooLong;
        assert_eq!(
            frame_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], &limits()),
            Err(err)
        );
        let bytes = [0x30, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert_eq!(decode(&bytes, &limits()), Err(err));
    }

    #[test]
    fn too_many_topic_filters() {
        let two = Limits {
            topics_per_subscribe_max: 2,
            ..Limits::default()
        };
        let filter = [0, 1, b'a', 0];
        let err = Err(DecodeError::TooManyTopicFilters { max: 2 });
        assert!(decode(&subscribe(&filter.repeat(2)), &two).is_ok());
        assert_eq!(decode(&subscribe(&filter.repeat(3)), &two), err);

        let mut body = vec![0, 10];
        body.extend_from_slice(&[0, 1, b'a'].repeat(3));
        assert_eq!(decode(&raw(0xA2, &body), &two), err);
    }

    // --- One test per error variant -----------------------------------------

    #[test]
    fn reserved_packet_types() {
        assert_eq!(
            decode(&[0x00, 0], &limits()),
            Err(DecodeError::ReservedPacketType(0))
        );
        assert_eq!(
            frame_len(&[0xF0], &limits()),
            Err(DecodeError::ReservedPacketType(15))
        );
    }

    #[test]
    fn invalid_fixed_header_flags() {
        let cases = [
            (0x11, PacketType::Connect, 1),
            (0x28, PacketType::ConnAck, 8),
            (0x42, PacketType::PubAck, 2),
            (0x60, PacketType::PubRel, 0),
            (0x63, PacketType::PubRel, 3),
            (0x80, PacketType::Subscribe, 0),
            (0xA0, PacketType::Unsubscribe, 0),
            (0xB2, PacketType::UnsubAck, 2),
            (0xC1, PacketType::PingReq, 1),
            (0xEF, PacketType::Disconnect, 15),
        ];
        for (first, packet_type, flags) in cases {
            assert_eq!(
                frame_len(&[first], &limits()),
                Err(DecodeError::InvalidFlags { packet_type, flags })
            );
        }
    }

    #[test]
    fn publish_qos_3() {
        assert_eq!(
            frame_len(&[0x36], &limits()),
            Err(DecodeError::InvalidPublishQos)
        );
    }

    #[test]
    fn publish_dup_at_qos_0() {
        assert_eq!(frame_len(&[0x38], &limits()), Err(DecodeError::DupWithQos0));
        // DUP at QoS 1 is fine.
        assert_eq!(frame_len(&[0x3A, 0], &limits()), Ok(Some(2)));
    }

    #[test]
    fn body_where_none_is_allowed() {
        for (first, packet_type) in [
            (0xC0, PacketType::PingReq),
            (0xD0, PacketType::PingResp),
            (0xE0, PacketType::Disconnect),
        ] {
            let err = DecodeError::UnexpectedBody(packet_type);
            assert_eq!(frame_len(&[first, 1], &limits()), Err(err));
            assert_eq!(decode(&[first, 1, 0], &limits()), Err(err));
        }
    }

    #[test]
    fn truncated_fields() {
        let t = |ty| Err(DecodeError::Truncated(ty));
        assert_eq!(decode_all(&[0x40, 1, 0]), t(PacketType::PubAck));
        assert_eq!(decode_all(&[0x20, 1, 0]), t(PacketType::ConnAck));
        // A topic length pointing past the end of the packet.
        assert_eq!(decode_all(&[0x30, 3, 0, 5, b'a']), t(PacketType::Publish));
        // QoS 1 PUBLISH without room for its packet id.
        assert_eq!(
            decode_all(&[0x32, 4, 0, 1, b'a', 0]),
            t(PacketType::Publish)
        );
        // A SUBSCRIBE filter without its options byte.
        assert_eq!(
            decode_all(&subscribe(&[0, 1, b'a'])),
            t(PacketType::Subscribe)
        );
        // A CONNECT ending in its payload.
        assert_eq!(
            decode_all(&raw(0x10, &connect_body(b"MQTT", 4, 0, &[0, 5, b'a']))),
            t(PacketType::Connect)
        );
    }

    #[test]
    fn trailing_bytes() {
        assert_eq!(
            decode_all(&[0x40, 3, 0, 1, 0]),
            Err(DecodeError::TrailingBytes(PacketType::PubAck))
        );
        assert_eq!(
            decode_all(&[0x20, 3, 0, 0, 0]),
            Err(DecodeError::TrailingBytes(PacketType::ConnAck))
        );
        let mut payload = string(b"id");
        payload.push(0);
        assert_eq!(
            decode_all(&raw(0x10, &connect_body(b"MQTT", 4, 0, &payload))),
            Err(DecodeError::TrailingBytes(PacketType::Connect))
        );
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(
            decode_all(&publish_with_topic(&[b'a', 0xFF])),
            Err(DecodeError::InvalidUtf8)
        );
        // A UTF-16 surrogate (U+D800) encoded as UTF-8 is ill-formed too.
        assert_eq!(
            decode_all(&publish_with_topic(&[0xED, 0xA0, 0x80])),
            Err(DecodeError::InvalidUtf8)
        );
        assert_eq!(
            decode_all(&raw(
                0x10,
                &connect_body(b"MQTT", 4, 0, &string(&[0xC0, 0x80]))
            )),
            Err(DecodeError::InvalidUtf8)
        );
    }

    #[test]
    fn null_character() {
        assert_eq!(
            decode_all(&publish_with_topic(b"a\0b")),
            Err(DecodeError::NullCharacter)
        );
        assert_eq!(
            decode_all(&raw(0x10, &connect_body(b"MQTT", 4, 0, &string(b"\0")))),
            Err(DecodeError::NullCharacter)
        );
    }

    #[test]
    fn invalid_protocol_name() {
        for name in [&b"MQIsdp"[..], b"mqtt", b"MQT", b"", &[0xFF, 0xFE]] {
            assert_eq!(
                decode_all(&raw(0x10, &connect_body(name, 4, 2, &string(b"id")))),
                Err(DecodeError::InvalidProtocolName)
            );
        }
    }

    #[test]
    fn unacceptable_protocol_level() {
        for level in [3, 5, 0, 255] {
            // Checked before the flags (reserved bit set here) and the payload.
            let err = decode_all(&raw(0x10, &connect_body(b"MQTT", level, 1, &[]))).unwrap_err();
            assert_eq!(err, DecodeError::UnacceptableProtocolLevel(level));
            assert_eq!(
                err.connack_code(),
                Some(ConnectReturnCode::UnacceptableProtocolVersion)
            );
        }
        assert_eq!(DecodeError::InvalidProtocolName.connack_code(), None);
    }

    #[test]
    fn connect_reserved_flag() {
        assert_eq!(
            connect_err(0x03, &string(b"id")),
            DecodeError::ConnectReservedFlag
        );
    }

    #[test]
    fn will_flags_without_will() {
        for flags in [0b0000_1000, 0b0001_0000, 0b0010_0000] {
            assert_eq!(
                connect_err(flags, &string(b"id")),
                DecodeError::WillFlagsWithoutWill
            );
        }
    }

    #[test]
    fn will_qos_3() {
        let mut payload = string(b"id");
        payload.extend_from_slice(&string(b"t"));
        payload.extend_from_slice(&string(b"m"));
        assert_eq!(
            connect_err(0b0001_1100, &payload),
            DecodeError::InvalidWillQos
        );
        // QoS 2 with retain is fine.
        assert!(decode_all(&raw(0x10, &connect_body(b"MQTT", 4, 0b0011_0100, &payload))).is_ok());
    }

    #[test]
    fn will_topic_is_a_topic_name() {
        let mut payload = string(b"id");
        payload.extend_from_slice(&string(b"a/#"));
        payload.extend_from_slice(&string(b"m"));
        assert_eq!(
            connect_err(0b0000_0100, &payload),
            DecodeError::WildcardInTopicName
        );
    }

    #[test]
    fn password_without_username() {
        let mut payload = string(b"id");
        payload.extend_from_slice(&string(b"pw"));
        assert_eq!(
            connect_err(0b0100_0000, &payload),
            DecodeError::PasswordWithoutUsername
        );
    }

    #[test]
    fn connack_checks() {
        assert_eq!(
            decode_all(&[0x20, 2, 2, 0]),
            Err(DecodeError::InvalidConnAckFlags(2))
        );
        assert_eq!(
            decode_all(&[0x20, 2, 0, 6]),
            Err(DecodeError::InvalidConnectReturnCode(6))
        );
        assert_eq!(
            decode_all(&[0x20, 2, 1, 4]),
            Err(DecodeError::SessionPresentOnRefusal)
        );
        for code in 0..=5 {
            assert_eq!(
                ConnectReturnCode::from_u8(code).map(|c| c as u8),
                Some(code)
            );
        }
    }

    #[test]
    fn zero_packet_id() {
        let zero = |ty| Err(DecodeError::ZeroPacketId(ty));
        assert_eq!(decode_all(&[0x40, 2, 0, 0]), zero(PacketType::PubAck));
        assert_eq!(decode_all(&[0x50, 2, 0, 0]), zero(PacketType::PubRec));
        assert_eq!(decode_all(&[0x62, 2, 0, 0]), zero(PacketType::PubRel));
        assert_eq!(decode_all(&[0x70, 2, 0, 0]), zero(PacketType::PubComp));
        assert_eq!(decode_all(&[0xB0, 2, 0, 0]), zero(PacketType::UnsubAck));
        assert_eq!(decode_all(&[0x90, 3, 0, 0, 0]), zero(PacketType::SubAck));
        assert_eq!(
            decode_all(&[0x82, 6, 0, 0, 0, 1, b'a', 0]),
            zero(PacketType::Subscribe)
        );
        assert_eq!(
            decode_all(&[0xA2, 5, 0, 0, 0, 1, b'a']),
            zero(PacketType::Unsubscribe)
        );
        assert_eq!(
            decode_all(&[0x32, 5, 0, 1, b'a', 0, 0]),
            zero(PacketType::Publish)
        );
        // QoS 0 has no packet id: those bytes are payload.
        assert!(decode_all(&[0x30, 5, 0, 1, b'a', 0, 0]).is_ok());
    }

    #[test]
    fn empty_topic() {
        assert_eq!(
            decode_all(&publish_with_topic(b"")),
            Err(DecodeError::EmptyTopic)
        );
        assert_eq!(
            decode_all(&subscribe(&[0, 0, 0])),
            Err(DecodeError::EmptyTopic)
        );
        assert_eq!(
            decode_all(&[0xA2, 4, 0, 1, 0, 0]),
            Err(DecodeError::EmptyTopic)
        );
    }

    #[test]
    fn wildcard_in_topic_name() {
        for topic in [&b"a/+"[..], b"#", b"a+b"] {
            assert_eq!(
                decode_all(&publish_with_topic(topic)),
                Err(DecodeError::WildcardInTopicName)
            );
        }
    }

    #[test]
    fn invalid_topic_filter() {
        let mut body = string(b"a/#/b");
        body.push(0);
        assert_eq!(
            decode_all(&subscribe(&body)),
            Err(DecodeError::InvalidTopicFilter)
        );
        let mut body = vec![0, 1];
        body.extend_from_slice(&string(b"a+"));
        assert_eq!(
            decode_all(&raw(0xA2, &body)),
            Err(DecodeError::InvalidTopicFilter)
        );
    }

    #[test]
    fn no_topic_filters() {
        assert_eq!(
            decode_all(&[0x82, 2, 0, 1]),
            Err(DecodeError::NoTopicFilters(PacketType::Subscribe))
        );
        assert_eq!(
            decode_all(&[0xA2, 2, 0, 1]),
            Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe))
        );
    }

    #[test]
    fn requested_qos_3() {
        assert_eq!(
            decode_all(&subscribe(&[0, 1, b'a', 3])),
            Err(DecodeError::InvalidRequestedQos)
        );
    }

    #[test]
    fn subscribe_options_reserved_bits() {
        for options in [0x04, 0x80, 0xFF] {
            assert_eq!(
                decode_all(&subscribe(&[0, 1, b'a', options])),
                Err(DecodeError::SubscribeReservedBits(options))
            );
        }
    }

    #[test]
    fn suback_checks() {
        assert_eq!(
            decode_all(&[0x90, 2, 0, 1]),
            Err(DecodeError::NoReturnCodes)
        );
        for code in [0x03, 0x7F, 0x81, 0xFF] {
            assert_eq!(
                decode_all(&[0x90, 4, 0, 1, 0, code]),
                Err(DecodeError::InvalidSubAckReturnCode(code))
            );
        }
        for code in [0x00, 0x01, 0x02, 0x80] {
            assert_eq!(
                SubAckReturnCode::from_u8(code).map(|c| c.to_u8()),
                Some(code)
            );
        }
    }

    #[test]
    fn packet_types_round_trip() {
        for value in 0..=255u8 {
            match PacketType::from_u8(value) {
                Some(ty) => assert_eq!(ty as u8, value),
                None => assert!(value == 0 || value >= 15),
            }
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        assert_eq!(
            DecodeError::UnacceptableProtocolLevel(5).to_string(),
            "CONNECT protocol level 5, only 4 (MQTT 3.1.1) is supported"
        );
        assert_eq!(
            DecodeError::InvalidFlags {
                packet_type: PacketType::PubRel,
                flags: 0
            }
            .to_string(),
            "PubRel with reserved fixed-header flags 0b0000"
        );
    }
}
