//! MQTT 3.1.1 for Iris: a sans-IO codec of the 14 control packets, written
//! here (no MQTT crates), for the server's `--mqtt-listen` listener and tests.
//!
//! [`decode`] turns the bytes at the front of a buffer into a [`Packet`] that
//! borrows its topics, payloads and passwords from that buffer, or says it
//! needs more bytes; [`encode`] appends a packet's wire form to a `Vec<u8>`;
//! [`frame_len`] reads only the fixed header, for a reader deciding how many
//! bytes to wait for. Nothing here does I/O.
//!
//! Limits ([`Limits`], defaults in the `*_DEFAULT` constants): a whole packet
//! is at most [`Limits::packet_len_max`] bytes (default
//! [`PACKET_LEN_MAX_DEFAULT`], 256 KiB), rejected from the fixed header alone,
//! before its body arrives; the remaining-length varint is at most 4 bytes;
//! a SUBSCRIBE or UNSUBSCRIBE has at most [`Limits::topics_per_subscribe_max`]
//! topic filters (default [`TOPICS_PER_SUBSCRIBE_MAX_DEFAULT`], 16). Decoding
//! is strict: each rule of the spec it checks is its own [`DecodeError`].
//!
//! | Type        | Value | Direction | Flags  | Body                                              |
//! |-------------|------:|-----------|--------|---------------------------------------------------|
//! | CONNECT     |     1 | C → S     | `0000` | "MQTT", level 4, flags, keep alive; client id; will topic and message, user name, password if flagged |
//! | CONNACK     |     2 | S → C     | `0000` | session present, return code ([`ConnectReturnCode`]) |
//! | PUBLISH     |     3 | both      | DUP, QoS, RETAIN | topic name, packet id (QoS > 0), payload |
//! | PUBACK      |     4 | both      | `0000` | packet id (QoS 1 acknowledgement)                 |
//! | PUBREC      |     5 | both      | `0000` | packet id (QoS 2, part 1)                         |
//! | PUBREL      |     6 | both      | `0010` | packet id (QoS 2, part 2)                         |
//! | PUBCOMP     |     7 | both      | `0000` | packet id (QoS 2, part 3)                         |
//! | SUBSCRIBE   |     8 | C → S     | `0010` | packet id; 1.. of (topic filter, requested QoS)   |
//! | SUBACK      |     9 | S → C     | `0000` | packet id; 1.. of return code ([`SubAckReturnCode`]) |
//! | UNSUBSCRIBE |    10 | C → S     | `0010` | packet id; 1.. of topic filter                    |
//! | UNSUBACK    |    11 | S → C     | `0000` | packet id                                         |
//! | PINGREQ     |    12 | C → S     | `0000` | none                                              |
//! | PINGRESP    |    13 | S → C     | `0000` | none                                              |
//! | DISCONNECT  |    14 | C → S     | `0000` | none                                              |
//!
//! Types 0 and 15 are reserved. The wire layout of each body is in [`codec`].

pub mod codec;

pub use codec::{
    decode, encode, encoded_len, frame_len, ConnAck, Connect, ConnectReturnCode, DecodeError,
    Limits, Packet, PacketType, Publish, QoS, SubAck, SubAckReturnCode, Subscribe, Subscription,
    Unsubscribe, Will, FIXED_HEADER_LEN_MAX, PACKET_LEN_MAX_DEFAULT, PROTOCOL_LEVEL, PROTOCOL_NAME,
    REMAINING_LEN_MAX, TOPICS_PER_SUBSCRIBE_MAX_DEFAULT,
};

/// Entry points for fuzzers (mqtt/fuzz). Thin wrappers, so the target cannot rot.
#[doc(hidden)]
pub mod fuzzing {
    use crate::codec::{decode as decode_packet, encode, encoded_len, frame_len, Limits};

    /// Decodes every packet in `data`; asserts what must hold for any input:
    /// progress stays in bounds, [`frame_len`] agrees with the decoder, a
    /// packet one byte short needs more bytes, and a decoded packet re-encodes
    /// to bytes that decode to the same packet.
    pub fn decode(data: &[u8]) {
        let limits = Limits::default();
        let mut rest = data;
        loop {
            let framed = frame_len(rest, &limits);
            let (packet, consumed) = match decode_packet(rest, &limits) {
                Ok(Some(decoded)) => decoded,
                Ok(None) => {
                    // Need more: the header is incomplete or announces more.
                    match framed {
                        Ok(None) => {}
                        Ok(Some(len)) => assert!(len > rest.len()),
                        Err(e) => panic!("frame_len failed ({e}) where decode waits"),
                    }
                    return;
                }
                Err(e) => {
                    // A header error is the decoder's error too.
                    if let Err(header_error) = framed {
                        assert_eq!(header_error, e);
                    }
                    return;
                }
            };
            assert!(consumed >= 2 && consumed <= rest.len());
            assert_eq!(framed, Ok(Some(consumed)));
            assert_eq!(decode_packet(&rest[..consumed - 1], &limits), Ok(None));

            let mut out = Vec::new();
            encode(&packet, &mut out);
            assert_eq!(out.len(), encoded_len(&packet));
            // Only the varint may be longer on the way in (non-minimal form).
            assert!(out.len() <= consumed);
            assert_eq!(decode_packet(&out, &limits), Ok(Some((packet, out.len()))));
            rest = &rest[consumed..];
        }
    }
}
