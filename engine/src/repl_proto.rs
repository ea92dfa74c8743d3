//! The replication wire protocol between a primary and a replica, per shard,
//! sans-IO. Framing as the client protocol: `u32 len` (type + payload), `u8
//! type`, payload; integers little-endian. One TCP connection per shard.
//!
//! | type | name | dir | payload |
//! |------|------|-----|---------|
//! | 0x01 | HELLO | R→P | u32 magic "IRPL", u8 version, u32 shards, u32 slots, u32 shard, u64 epoch, u64 last_position, u64 last_record_epoch |
//! | 0x02 | WELCOME | P→R | u64 epoch, u8 mode (0 partial, 1 full), u64 start_position (the next position streamed), str client_addr |
//! | 0x03 | REFUSE | P→R or R→P | str reason (then close) |
//! | 0x04 | TRUNCATE | P→R | u64 keep_through: the replica drops every record after it, then streaming starts after it |
//! | 0x05 | FETCH | P→R | u64 from_position: instead of WELCOME, to a primary whose WAL lost its tail at recovery: the replica sends its records from there (RECORDS, R→P), then FETCH_END, and the session ends |
//! | 0x06 | FETCH_END | R→P | u64 last_position: the replica's last record; everything up to it was sent |
//! | 0x10 | SNAP_BEGIN | P→R | u64 first_position, u64 last_position, u64 records, u64 bytes |
//! | 0x11 | SNAP_CHUNK | P→R | u32 crc32 of the data, data: whole WAL record frames |
//! | 0x12 | SNAP_END | P→R | u32 crc32 of all chunk data |
//! | 0x20 | RECORDS | P→R | whole WAL record frames exactly as on the primary's disk (wal/FORMAT.md), dense positions |
//! | 0x21 | HEARTBEAT | P→R | u64 epoch, u64 last_position, u64 now_ms |
//! | 0x30 | ACK | R→P | u64 epoch, u64 durable_position, u64 now_ms |
//! | 0x31 | RESUBMIT | R→P | id16 msg_id, str sender, str recipient, body (the rest): a message of a tail this replica dropped when it rejoined (it was a primary), stored by the primary like a SEND from `sender` (msg_id dedup makes a repeat harmless) |
//!
//! Every frame carries or follows an epoch: a side that sees a higher epoch
//! than its own stops acting as primary (fencing).

pub const MAGIC: u32 = u32::from_le_bytes(*b"IRPL");
pub const VERSION: u8 = 1;
/// Largest replication frame: a RECORDS batch or snapshot chunk is cut below it.
pub const FRAME_LEN_MAX: u32 = 4 << 20;
/// Bytes of record frames per RECORDS or SNAP_CHUNK frame (below FRAME_LEN_MAX).
pub const BATCH_BYTES_MAX: usize = 1 << 20;
const _: () = assert!(BATCH_BYTES_MAX + 64 < FRAME_LEN_MAX as usize);

mod t {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const REFUSE: u8 = 0x03;
    pub const TRUNCATE: u8 = 0x04;
    pub const FETCH: u8 = 0x05;
    pub const FETCH_END: u8 = 0x06;
    pub const SNAP_BEGIN: u8 = 0x10;
    pub const SNAP_CHUNK: u8 = 0x11;
    pub const SNAP_END: u8 = 0x12;
    pub const RECORDS: u8 = 0x20;
    pub const HEARTBEAT: u8 = 0x21;
    pub const ACK: u8 = 0x30;
    pub const RESUBMIT: u8 = 0x31;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub shards: u32,
    pub slots: u32,
    pub shard: u32,
    pub epoch: u64,
    pub last_position: u64,
    pub last_record_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<'a> {
    Hello(Hello),
    Welcome {
        epoch: u64,
        full: bool,
        start_position: u64,
        client_addr: &'a str,
    },
    Refuse {
        reason: &'a str,
    },
    Truncate {
        keep_through: u64,
    },
    Fetch {
        from_position: u64,
    },
    FetchEnd {
        last_position: u64,
    },
    SnapBegin {
        first_position: u64,
        last_position: u64,
        records: u64,
        bytes: u64,
    },
    SnapChunk {
        crc: u32,
        data: &'a [u8],
    },
    SnapEnd {
        crc: u32,
    },
    Records {
        frames: &'a [u8],
    },
    Heartbeat {
        epoch: u64,
        last_position: u64,
        now_ms: u64,
    },
    Ack {
        epoch: u64,
        durable_position: u64,
        now_ms: u64,
    },
    Resubmit {
        msg_id: [u8; 16],
        sender: &'a str,
        recipient: &'a str,
        body: &'a [u8],
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("replication frame length {0} is 0 or over {FRAME_LEN_MAX}")]
    BadLength(u32),
    #[error("unknown replication frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed replication frame: {0}")]
    Malformed(&'static str),
    #[error("not an Iris replication peer (bad magic or version)")]
    BadMagic,
}

fn frame(out: &mut Vec<u8>, ty: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(ty);
    body(out);
    let len = (out.len() - start - 4) as u32;
    assert!(len <= FRAME_LEN_MAX, "replication frame over its bound");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = net::codec::truncate_str(s, 255);
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

pub fn encode(msg: &Msg<'_>, out: &mut Vec<u8>) {
    let u64s = |out: &mut Vec<u8>, vals: &[u64]| {
        vals.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
    };
    match msg {
        Msg::Hello(h) => frame(out, t::HELLO, |o| {
            o.extend_from_slice(&MAGIC.to_le_bytes());
            o.push(VERSION);
            for v in [h.shards, h.slots, h.shard] {
                o.extend_from_slice(&v.to_le_bytes());
            }
            u64s(o, &[h.epoch, h.last_position, h.last_record_epoch]);
        }),
        Msg::Welcome {
            epoch,
            full,
            start_position,
            client_addr,
        } => frame(out, t::WELCOME, |o| {
            o.extend_from_slice(&epoch.to_le_bytes());
            o.push(u8::from(*full));
            o.extend_from_slice(&start_position.to_le_bytes());
            put_str(o, client_addr);
        }),
        Msg::Refuse { reason } => frame(out, t::REFUSE, |o| put_str(o, reason)),
        Msg::Truncate { keep_through } => frame(out, t::TRUNCATE, |o| u64s(o, &[*keep_through])),
        Msg::Fetch { from_position } => frame(out, t::FETCH, |o| u64s(o, &[*from_position])),
        Msg::FetchEnd { last_position } => frame(out, t::FETCH_END, |o| u64s(o, &[*last_position])),
        Msg::SnapBegin {
            first_position,
            last_position,
            records,
            bytes,
        } => frame(out, t::SNAP_BEGIN, |o| {
            u64s(o, &[*first_position, *last_position, *records, *bytes])
        }),
        Msg::SnapChunk { crc, data } => frame(out, t::SNAP_CHUNK, |o| {
            o.extend_from_slice(&crc.to_le_bytes());
            o.extend_from_slice(data);
        }),
        Msg::SnapEnd { crc } => frame(out, t::SNAP_END, |o| {
            o.extend_from_slice(&crc.to_le_bytes())
        }),
        Msg::Records { frames } => frame(out, t::RECORDS, |o| o.extend_from_slice(frames)),
        Msg::Heartbeat {
            epoch,
            last_position,
            now_ms,
        } => frame(out, t::HEARTBEAT, |o| {
            u64s(o, &[*epoch, *last_position, *now_ms])
        }),
        Msg::Ack {
            epoch,
            durable_position,
            now_ms,
        } => frame(out, t::ACK, |o| {
            u64s(o, &[*epoch, *durable_position, *now_ms])
        }),
        Msg::Resubmit {
            msg_id,
            sender,
            recipient,
            body,
        } => frame(out, t::RESUBMIT, |o| {
            o.extend_from_slice(msg_id);
            put_str(o, sender);
            put_str(o, recipient);
            o.extend_from_slice(body);
        }),
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Malformed("truncated field"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn str(&mut self) -> Result<&'a str, ProtoError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| ProtoError::Malformed("invalid UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn done(&self) -> Result<(), ProtoError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

/// The length of the whole frame at the start of `buf` (header included),
/// checked against its bound as soon as the 4 length bytes are there;
/// Ok(None) until the whole frame is in `buf`.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    let Some(header) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("4"));
    if len == 0 || len > FRAME_LEN_MAX {
        return Err(ProtoError::BadLength(len));
    }
    let total = 4 + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Ok(None): not a whole frame yet. Ok(Some((msg, consumed))) otherwise.
pub fn decode(buf: &[u8]) -> Result<Option<(Msg<'_>, usize)>, ProtoError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    let mut c = Cursor(&buf[5..total]);
    let msg = match buf[4] {
        t::HELLO => {
            if c.u32()? != MAGIC || c.u8()? != VERSION {
                return Err(ProtoError::BadMagic);
            }
            let (shards, slots, shard) = (c.u32()?, c.u32()?, c.u32()?);
            let (epoch, last_position, last_record_epoch) = (c.u64()?, c.u64()?, c.u64()?);
            Msg::Hello(Hello {
                shards,
                slots,
                shard,
                epoch,
                last_position,
                last_record_epoch,
            })
        }
        t::WELCOME => {
            let epoch = c.u64()?;
            let full = match c.u8()? {
                0 => false,
                1 => true,
                _ => return Err(ProtoError::Malformed("sync mode")),
            };
            Msg::Welcome {
                epoch,
                full,
                start_position: c.u64()?,
                client_addr: c.str()?,
            }
        }
        t::REFUSE => Msg::Refuse { reason: c.str()? },
        t::FETCH => Msg::Fetch {
            from_position: c.u64()?,
        },
        t::FETCH_END => Msg::FetchEnd {
            last_position: c.u64()?,
        },
        t::TRUNCATE => Msg::Truncate {
            keep_through: c.u64()?,
        },
        t::SNAP_BEGIN => Msg::SnapBegin {
            first_position: c.u64()?,
            last_position: c.u64()?,
            records: c.u64()?,
            bytes: c.u64()?,
        },
        t::SNAP_CHUNK => Msg::SnapChunk {
            crc: c.u32()?,
            data: c.rest(),
        },
        t::SNAP_END => Msg::SnapEnd { crc: c.u32()? },
        t::RECORDS => Msg::Records { frames: c.rest() },
        t::HEARTBEAT => Msg::Heartbeat {
            epoch: c.u64()?,
            last_position: c.u64()?,
            now_ms: c.u64()?,
        },
        t::ACK => Msg::Ack {
            epoch: c.u64()?,
            durable_position: c.u64()?,
            now_ms: c.u64()?,
        },
        t::RESUBMIT => Msg::Resubmit {
            msg_id: c.take(16)?.try_into().expect("16"),
            sender: c.str()?,
            recipient: c.str()?,
            body: c.rest(),
        },
        other => return Err(ProtoError::UnknownType(other)),
    };
    c.done()?;
    Ok(Some((msg, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg<'static>> {
        vec![
            Msg::Hello(Hello {
                shards: 2,
                slots: 16384,
                shard: 1,
                epoch: 3,
                last_position: 9,
                last_record_epoch: 2,
            }),
            Msg::Welcome {
                epoch: 3,
                full: true,
                start_position: 10,
                client_addr: "127.0.0.1:7070",
            },
            Msg::Refuse {
                reason: "shard count differs",
            },
            Msg::Truncate { keep_through: 7 },
            Msg::Fetch { from_position: 11 },
            Msg::FetchEnd { last_position: 12 },
            Msg::SnapBegin {
                first_position: 5,
                last_position: 9,
                records: 5,
                bytes: 100,
            },
            Msg::SnapChunk {
                crc: 1,
                data: b"abc",
            },
            Msg::SnapEnd { crc: 2 },
            Msg::Records { frames: b"frames" },
            Msg::Heartbeat {
                epoch: 3,
                last_position: 9,
                now_ms: 5,
            },
            Msg::Ack {
                epoch: 3,
                durable_position: 9,
                now_ms: 5,
            },
            Msg::Resubmit {
                msg_id: [7; 16],
                sender: "alice",
                recipient: "bob",
                body: b"a message of a dropped tail",
            },
        ]
    }

    #[test]
    fn every_message_round_trips_and_partial_input_waits() {
        for msg in all() {
            let mut buf = Vec::new();
            encode(&msg, &mut buf);
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), Ok(None), "{msg:?} cut at {cut}");
            }
            assert_eq!(decode(&buf), Ok(Some((msg.clone(), buf.len()))));
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(decode(&[0, 0, 0, 0]), Err(ProtoError::BadLength(0)));
        assert_eq!(
            decode(&u32::MAX.to_le_bytes()),
            Err(ProtoError::BadLength(u32::MAX))
        );
        assert_eq!(
            decode(&[1, 0, 0, 0, 0x7e]),
            Err(ProtoError::UnknownType(0x7e))
        );
        let mut buf = Vec::new();
        encode(&Msg::Truncate { keep_through: 1 }, &mut buf);
        buf[0] += 1;
        buf.push(0);
        assert_eq!(decode(&buf), Err(ProtoError::Malformed("trailing bytes")));
        let mut hello = Vec::new();
        encode(&all()[0], &mut hello);
        hello[5] ^= 1;
        assert_eq!(decode(&hello), Err(ProtoError::BadMagic));
    }
}

/// Entry point for the fuzzer (engine/fuzz, target `decode_repl`). Here, not in
/// the target, so it is compiled and property-tested with the crate and cannot rot.
#[doc(hidden)]
pub mod fuzzing {
    use super::{decode, encode, frame_len, ProtoError};

    /// Decodes every frame in `data` as a stream; asserts what must hold for any
    /// input: `frame_len` and `decode` agree (same length, same length error,
    /// same "not yet"), progress stays in bounds, and a decoded frame re-encodes
    /// to exactly its bytes.
    pub fn decode_repl(data: &[u8]) {
        let mut rest = data;
        loop {
            let len = frame_len(rest);
            let decoded = decode(rest);
            match (&len, &decoded) {
                (Ok(None), Ok(None)) => break,
                (Err(a), Err(b)) => {
                    assert_eq!(a, b);
                    assert!(matches!(a, ProtoError::BadLength(_)));
                    break;
                }
                (Ok(Some(n)), Err(e)) => {
                    assert!(*n >= 5 && *n <= rest.len());
                    assert!(!matches!(e, ProtoError::BadLength(_)), "{e:?}");
                    // A bad frame body does not stop the framing: skip it.
                    rest = &rest[*n..];
                }
                (Ok(Some(n)), Ok(Some((msg, consumed)))) => {
                    assert_eq!(n, consumed);
                    assert!(*consumed >= 5 && *consumed <= rest.len());
                    let mut out = Vec::new();
                    encode(msg, &mut out);
                    assert_eq!(out, &rest[..*consumed], "{msg:?}");
                    rest = &rest[*consumed..];
                }
                _ => panic!("frame_len {len:?} and decode {decoded:?} disagree"),
            }
        }
    }
}

#[cfg(test)]
mod fuzz_props {
    use super::*;
    use proptest::prelude::*;

    fn hello() -> impl Strategy<Value = Hello> {
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(
                |(shards, slots, shard, epoch, last_position, last_record_epoch)| Hello {
                    shards,
                    slots,
                    shard,
                    epoch,
                    last_position,
                    last_record_epoch,
                },
            )
    }

    /// Every message kind, with owned data the test borrows from.
    #[derive(Debug, Clone)]
    enum Owned {
        Hello(Hello),
        Welcome(u64, bool, u64, String),
        Refuse(String),
        Truncate(u64),
        Fetch(u64),
        FetchEnd(u64),
        SnapBegin(u64, u64, u64, u64),
        SnapChunk(u32, Vec<u8>),
        SnapEnd(u32),
        Records(Vec<u8>),
        Heartbeat(u64, u64, u64),
        Ack(u64, u64, u64),
        Resubmit([u8; 16], String, String, Vec<u8>),
    }

    impl Owned {
        fn msg(&self) -> Msg<'_> {
            match self {
                Owned::Hello(h) => Msg::Hello(h.clone()),
                Owned::Welcome(epoch, full, start_position, client_addr) => Msg::Welcome {
                    epoch: *epoch,
                    full: *full,
                    start_position: *start_position,
                    client_addr,
                },
                Owned::Refuse(reason) => Msg::Refuse { reason },
                Owned::Truncate(keep_through) => Msg::Truncate {
                    keep_through: *keep_through,
                },
                Owned::Fetch(from_position) => Msg::Fetch {
                    from_position: *from_position,
                },
                Owned::FetchEnd(last_position) => Msg::FetchEnd {
                    last_position: *last_position,
                },
                Owned::SnapBegin(first_position, last_position, records, bytes) => Msg::SnapBegin {
                    first_position: *first_position,
                    last_position: *last_position,
                    records: *records,
                    bytes: *bytes,
                },
                Owned::SnapChunk(crc, data) => Msg::SnapChunk { crc: *crc, data },
                Owned::SnapEnd(crc) => Msg::SnapEnd { crc: *crc },
                Owned::Records(frames) => Msg::Records { frames },
                Owned::Heartbeat(epoch, last_position, now_ms) => Msg::Heartbeat {
                    epoch: *epoch,
                    last_position: *last_position,
                    now_ms: *now_ms,
                },
                Owned::Ack(epoch, durable_position, now_ms) => Msg::Ack {
                    epoch: *epoch,
                    durable_position: *durable_position,
                    now_ms: *now_ms,
                },
                Owned::Resubmit(msg_id, sender, recipient, body) => Msg::Resubmit {
                    msg_id: *msg_id,
                    sender,
                    recipient,
                    body,
                },
            }
        }
    }

    /// Strings the encoder keeps whole: at most 63 chars, so at most 252 bytes
    /// of UTF-8 (the wire's limit is 255).
    fn str255() -> impl Strategy<Value = String> {
        ".{0,63}"
    }

    fn owned() -> impl Strategy<Value = Owned> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..512);
        prop_oneof![
            hello().prop_map(Owned::Hello),
            (any::<u64>(), any::<bool>(), any::<u64>(), str255())
                .prop_map(|(e, f, s, a)| Owned::Welcome(e, f, s, a)),
            str255().prop_map(Owned::Refuse),
            any::<u64>().prop_map(Owned::Truncate),
            any::<u64>().prop_map(Owned::Fetch),
            any::<u64>().prop_map(Owned::FetchEnd),
            any::<(u64, u64, u64, u64)>().prop_map(|(a, b, c, d)| Owned::SnapBegin(a, b, c, d)),
            (any::<u32>(), bytes()).prop_map(|(c, d)| Owned::SnapChunk(c, d)),
            any::<u32>().prop_map(Owned::SnapEnd),
            bytes().prop_map(Owned::Records),
            any::<(u64, u64, u64)>().prop_map(|(a, b, c)| Owned::Heartbeat(a, b, c)),
            any::<(u64, u64, u64)>().prop_map(|(a, b, c)| Owned::Ack(a, b, c)),
            (any::<[u8; 16]>(), str255(), str255(), bytes())
                .prop_map(|(i, s, r, b)| Owned::Resubmit(i, s, r, b)),
        ]
    }

    /// Bytes that are often a plausible frame: a small length, a known type.
    fn framed_bytes() -> impl Strategy<Value = Vec<u8>> {
        let known = prop_oneof![
            Just(0x01u8),
            Just(0x02),
            Just(0x03),
            Just(0x04),
            Just(0x05),
            Just(0x06),
            Just(0x10),
            Just(0x11),
            Just(0x12),
            Just(0x20),
            Just(0x21),
            Just(0x30),
            Just(0x31),
            any::<u8>(),
        ];
        (
            known,
            proptest::collection::vec(any::<u8>(), 0..96),
            0usize..8,
        )
            .prop_map(|(ty, body, slack)| {
                let len = (body.len() + 1) as u32;
                let mut buf = len.to_le_bytes().to_vec();
                buf.push(ty);
                buf.extend_from_slice(&body);
                // Sometimes short of the whole frame, sometimes with a next one.
                buf.truncate(buf.len().saturating_sub(slack % 3));
                buf.resize(buf.len() + slack / 3, 0x21);
                buf
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(
            data in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            fuzzing::decode_repl(&data);
        }

        #[test]
        fn plausible_frames_never_panic_the_decoder(data in framed_bytes()) {
            fuzzing::decode_repl(&data);
        }

        #[test]
        fn every_message_round_trips(owned in owned(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let msg = owned.msg();
            let mut buf = Vec::new();
            encode(&msg, &mut buf);
            let total = buf.len();
            prop_assert_eq!(frame_len(&buf), Ok(Some(total)));
            prop_assert_eq!(decode(&buf[..total - 1]), Ok(None));
            // Bytes after the frame (the next frame) are not consumed.
            buf.extend_from_slice(&tail);
            prop_assert_eq!(decode(&buf), Ok(Some((msg, total))));
        }
    }
}
