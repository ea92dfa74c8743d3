//! Property tests of the codec: every valid packet round-trips, any bytes
//! decode without panicking (the checks live in `mqtt::fuzzing`, shared with
//! the cargo-fuzz target), and a stream split anywhere decodes the same.

use mqtt::{
    decode, encode, fuzzing, ConnAck, Connect, ConnectReturnCode, Limits, Packet, Publish, QoS,
    SubAck, SubAckReturnCode, Subscribe, Subscription, Unsubscribe, Will,
    TOPICS_PER_SUBSCRIBE_MAX_DEFAULT,
};
use proptest::prelude::*;
use proptest::sample::select;

/// Enough cases to reach deep into every packet type; a few seconds in release.
const CASES: u32 = 20_000;

// The strategies build `Packet<'static>` by leaking their strings and bytes:
// a few MB over a test run, and it keeps the generators as simple as the type.
fn leak_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn leak_bytes(b: Vec<u8>) -> &'static [u8] {
    Box::leak(b.into_boxed_slice())
}

fn qos() -> impl Strategy<Value = QoS> {
    select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(leak_bytes)
}

/// Any string without U+0000 (multi-byte characters included).
fn string(min: usize, max: usize) -> impl Strategy<Value = &'static str> {
    prop::collection::vec(
        any::<char>().prop_filter("no NUL", |&c| c != '\0'),
        min..max,
    )
    .prop_map(|chars| leak_str(chars.into_iter().collect()))
}

/// A topic name: non-empty, no wildcards, levels and multi-byte characters.
fn topic_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        "[a-z/ ]{1,12}".prop_map(leak_str),
        string(1, 12).prop_filter_map("no wildcards", |s| (!s.contains(['+', '#'])).then_some(s)),
    ]
}

/// A topic filter: levels of text or `+`, optionally ending in `#`.
fn topic_filter() -> impl Strategy<Value = &'static str> {
    let level = prop_oneof!["[a-zé ]{0,5}", Just("+".to_string())];
    (prop::collection::vec(level, 1..5), any::<bool>()).prop_map(|(mut levels, multi)| {
        if multi {
            levels.push("#".to_string());
        }
        let filter = levels.join("/");
        leak_str(if filter.is_empty() {
            "#".into()
        } else {
            filter
        })
    })
}

fn will() -> impl Strategy<Value = Will<'static>> {
    (topic_name(), bytes(32), qos(), any::<bool>()).prop_map(|(topic, message, qos, retain)| Will {
        topic,
        message,
        qos,
        retain,
    })
}

fn connect() -> impl Strategy<Value = Packet<'static>> {
    (
        any::<bool>(),
        any::<u16>(),
        string(0, 24),
        prop::option::of(will()),
        // A password only with a user name.
        prop::option::of((string(0, 12), prop::option::of(bytes(16)))),
    )
        .prop_map(|(clean_session, keep_alive, client_id, will, login)| {
            Packet::Connect(Connect {
                clean_session,
                keep_alive,
                client_id,
                will,
                username: login.map(|(user, _)| user),
                password: login.and_then(|(_, password)| password),
            })
        })
}

fn connack() -> impl Strategy<Value = Packet<'static>> {
    (0..=5u8, any::<bool>()).prop_map(|(code, present)| {
        let code = ConnectReturnCode::from_u8(code).unwrap();
        Packet::ConnAck(ConnAck {
            // Session present only on acceptance.
            session_present: present && code == ConnectReturnCode::Accepted,
            code,
        })
    })
}

fn publish() -> impl Strategy<Value = Packet<'static>> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        bytes(64),
    )
        .prop_map(|(qos, dup, retain, topic, packet_id, payload)| {
            let at_least_once = qos != QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && at_least_once,
                qos,
                retain,
                topic,
                packet_id: if at_least_once { packet_id } else { 0 },
                payload,
            })
        })
}

fn filters_count() -> std::ops::RangeInclusive<usize> {
    1..=TOPICS_PER_SUBSCRIBE_MAX_DEFAULT
}

fn subscribe() -> impl Strategy<Value = Packet<'static>> {
    let subscription =
        (topic_filter(), qos()).prop_map(|(filter, qos)| Subscription { filter, qos });
    (
        packet_id(),
        prop::collection::vec(subscription, filters_count()),
    )
        .prop_map(|(packet_id, filters)| Packet::Subscribe(Subscribe { packet_id, filters }))
}

fn suback() -> impl Strategy<Value = Packet<'static>> {
    let code = prop_oneof![
        qos().prop_map(SubAckReturnCode::Success),
        Just(SubAckReturnCode::Failure)
    ];
    (packet_id(), prop::collection::vec(code, 1..40)).prop_map(|(packet_id, return_codes)| {
        Packet::SubAck(SubAck {
            packet_id,
            return_codes,
        })
    })
}

fn unsubscribe() -> impl Strategy<Value = Packet<'static>> {
    (
        packet_id(),
        prop::collection::vec(topic_filter(), filters_count()),
    )
        .prop_map(|(packet_id, filters)| Packet::Unsubscribe(Unsubscribe { packet_id, filters }))
}

/// Any valid packet of any of the 14 types.
fn packet() -> impl Strategy<Value = Packet<'static>> {
    prop_oneof![
        connect(),
        connack(),
        publish(),
        packet_id().prop_map(|packet_id| Packet::PubAck { packet_id }),
        packet_id().prop_map(|packet_id| Packet::PubRec { packet_id }),
        packet_id().prop_map(|packet_id| Packet::PubRel { packet_id }),
        packet_id().prop_map(|packet_id| Packet::PubComp { packet_id }),
        subscribe(),
        suback(),
        unsubscribe(),
        packet_id().prop_map(|packet_id| Packet::UnsubAck { packet_id }),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn encoded(p: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode(p, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// (a) encode then decode gives back the packet, using all its bytes.
    #[test]
    fn valid_packets_round_trip(p in packet()) {
        let bytes = encoded(&p);
        prop_assert_eq!(decode(&bytes, &Limits::default()), Ok(Some((p, bytes.len()))));
    }

    /// (b) Arbitrary bytes: no panic, progress in bounds, re-encoding agrees.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        fuzzing::decode(&data);
    }

    /// (b) Bytes close to valid ones (one byte changed, or cut short) reach
    /// deep into every decoder, where uniform bytes rarely get.
    #[test]
    fn mutated_packets_never_panic(
        p in packet(),
        index in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(&p);
        let i = index.index(bytes.len());
        bytes[i] = byte;
        fuzzing::decode(&bytes);
        fuzzing::decode(&bytes[..cut.index(bytes.len() + 1)]);
    }

    /// (c) A stream of packets fed in arbitrary chunks decodes to the same
    /// packets, in order, as a reader buffering incrementally would see them.
    #[test]
    fn split_stream_decodes_the_same(
        packets in prop::collection::vec(packet(), 1..8),
        splits in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let stream: Vec<u8> = packets.iter().flat_map(encoded).collect();
        let mut cuts: Vec<usize> = splits.iter().map(|s| s.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();

        let limits = Limits::default();
        let mut buf = Vec::new();
        let mut fed = 0;
        let mut expected = packets.iter();
        for cut in cuts {
            buf.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            while let Some((p, consumed)) = decode(&buf, &limits).unwrap() {
                prop_assert_eq!(Some(&p), expected.next());
                buf.drain(..consumed);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(expected.next(), None);
    }
}
