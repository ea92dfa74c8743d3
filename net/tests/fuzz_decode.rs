//! Property tests of the decoders: any bytes in, no panic, progress in bounds,
//! and whatever decodes re-encodes to exactly the bytes it came from (the
//! checks live in `net::fuzzing`, shared with the cargo-fuzz target).

use net::codec::{
    decode_client_frame, decode_server_frame, encode_client_frame, encode_server_frame, frame_type,
    ClientFrame, MsgId, ServerFrame,
};
use net::{fuzzing, Limits};
use proptest::prelude::*;

/// Enough cases to reach deep into every frame type; about a second in release.
const CASES: u32 = 50_000;

const ALL_TYPES: [u8; 11] = [
    frame_type::HELLO,
    frame_type::WELCOME,
    frame_type::SEND,
    frame_type::STORED,
    frame_type::REJECTED,
    frame_type::DELIVER,
    frame_type::ACK,
    frame_type::PING,
    frame_type::PONG,
    frame_type::BYE,
    frame_type::ERROR,
];

/// Plausible frames: a true length, a known type, random payload. Uniform
/// random bytes almost always fail at the length check; these get past it.
fn plausible_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(ALL_TYPES.to_vec()),
        prop::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(|(ty, payload)| {
            let mut out = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
            out.push(ty);
            out.extend_from_slice(&payload);
            out
        })
}

fn plausible_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(plausible_frame(), 1..6).prop_map(|frames| frames.concat())
}

fn small_str() -> impl Strategy<Value = String> {
    "\\PC{0,20}".prop_filter("fits a str field", |s| s.len() <= 255)
}

fn client_frame() -> impl Strategy<Value = (u8, MsgId, String, Vec<u8>, u64)> {
    (
        prop::sample::select(vec![0u8, 1, 2, 3, 4]),
        any::<MsgId>(),
        small_str(),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<u64>(),
    )
}

fn build_client<'a>(kind: u8, id: MsgId, s: &'a str, b: &'a [u8], n: u64) -> ClientFrame<'a> {
    match kind {
        0 => ClientFrame::Hello {
            version: n as u8,
            user: s,
            token: b,
        },
        1 => ClientFrame::Send {
            msg_id: id,
            to: s,
            body: b,
        },
        2 => ClientFrame::Ack { seq: n },
        3 => ClientFrame::Ping { nonce: n },
        _ => ClientFrame::Bye,
    }
}

fn build_server<'a>(kind: u8, id: MsgId, s: &'a str, b: &'a [u8], n: u64) -> ServerFrame<'a> {
    match kind {
        0 => ServerFrame::Welcome {
            version: n as u8,
            server_time_ms: n,
            max_frame: n as u32,
            pending: n.rotate_left(7),
        },
        1 => ServerFrame::Stored { msg_id: id },
        2 => ServerFrame::Rejected {
            msg_id: id,
            code: n as u16,
            reason: s,
        },
        3 => ServerFrame::Deliver {
            seq: n,
            msg_id: id,
            from: s,
            sent_ms: !n,
            body: b,
        },
        4 => ServerFrame::Pong { nonce: n },
        _ => ServerFrame::Error {
            code: n as u16,
            reason: s,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn decoders_survive_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzzing::decode_client(&data);
        fuzzing::decode_server(&data);
    }

    #[test]
    fn decoders_survive_plausible_frames(data in plausible_stream()) {
        fuzzing::decode_client(&data);
        fuzzing::decode_server(&data);
    }

    /// Valid frames with bytes flipped: errors must stay errors, never panics.
    #[test]
    fn decoders_survive_mutated_frames(
        (kind, id, s, b, n) in client_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut buf = Vec::new();
        encode_client_frame(&build_client(kind, id, &s, &b, n), &mut buf);
        encode_server_frame(&build_server(kind, id, &s, &b, n), &mut buf);
        for (at, xor) in flips {
            let i = at.index(buf.len());
            buf[i] ^= xor;
        }
        fuzzing::decode_client(&buf);
        fuzzing::decode_server(&buf);
    }

    #[test]
    fn any_client_frame_round_trips((kind, id, s, b, n) in client_frame()) {
        let frame = build_client(kind, id, &s, &b, n);
        let mut buf = Vec::new();
        encode_client_frame(&frame, &mut buf);
        let decoded = decode_client_frame(&buf, &Limits::default());
        prop_assert_eq!(decoded, Ok(Some((frame, buf.len()))));
    }

    #[test]
    fn any_server_frame_round_trips((kind, id, s, b, n) in client_frame()) {
        let frame = build_server(kind, id, &s, &b, n);
        let mut buf = Vec::new();
        encode_server_frame(&frame, &mut buf);
        let decoded = decode_server_frame(&buf, &Limits::default());
        prop_assert_eq!(decoded, Ok(Some((frame, buf.len()))));
    }
}
