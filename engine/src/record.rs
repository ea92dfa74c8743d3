//! The engine's WAL record payloads, sans-IO: the `wal` crate frames, checksums
//! and positions each record; this module owns what is inside.
//!
//! All integers little-endian. `str8` = u8 length + UTF-8 bytes.
//!
//! | type | name   | payload |
//! |------|--------|---------|
//! | 1    | MSG    | str8 recipient, u64 seq, str8 sender, [16] msg_id, u64 sent_ms, u32 body_len, body |
//! | 2    | ACK    | str8 recipient, u64 acked_seq: every seq <= acked_seq is consumed |
//! | 3    | DEDUP  | u32 count, then count x (u64 sender_hash, [16] msg_id, u64 stored_ms) |
//! | 4    | CKPT   | u64 checkpoint_start_position: the live state restated since it is complete |
//!
//! Replay is idempotent and a checkpoint only restates state (ACK first, then the
//! pending MSGs of each recipient, then DEDUP batches), so a crash in the middle
//! of writing a checkpoint leaves a log that still replays to the right state.

pub const MSG: u8 = 1;
pub const ACK: u8 = 2;
pub const DEDUP: u8 = 3;
pub const CKPT: u8 = 4;

/// Entries per DEDUP record (32 bytes each), so a record stays far below the WAL's record limit.
pub const DEDUP_ENTRIES_PER_RECORD: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsgRecord<'a> {
    pub recipient: &'a str,
    pub seq: u64,
    pub sender: &'a str,
    pub msg_id: [u8; 16],
    pub sent_ms: u64,
    pub body: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupEntry {
    pub sender_hash: u64,
    pub msg_id: [u8; 16],
    pub stored_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    Msg(MsgRecord<'a>),
    Ack { recipient: &'a str, acked_seq: u64 },
    Dedup(Vec<DedupEntry>),
    Checkpoint { start: u64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed WAL record (type {record_type}): {why}")]
pub struct RecordError {
    pub record_type: u8,
    pub why: &'static str,
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("user ids are at most 64 bytes");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

pub fn encode_msg(m: &MsgRecord<'_>, out: &mut Vec<u8>) {
    out.clear();
    put_str8(out, m.recipient);
    out.extend_from_slice(&m.seq.to_le_bytes());
    put_str8(out, m.sender);
    out.extend_from_slice(&m.msg_id);
    out.extend_from_slice(&m.sent_ms.to_le_bytes());
    let body_len = u32::try_from(m.body.len()).expect("body bounded by body_len_max");
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(m.body);
}

pub fn encode_ack(recipient: &str, acked_seq: u64, out: &mut Vec<u8>) {
    out.clear();
    put_str8(out, recipient);
    out.extend_from_slice(&acked_seq.to_le_bytes());
}

pub fn encode_dedup(entries: &[DedupEntry], out: &mut Vec<u8>) {
    assert!(entries.len() <= DEDUP_ENTRIES_PER_RECORD);
    out.clear();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.sender_hash.to_le_bytes());
        out.extend_from_slice(&e.msg_id);
        out.extend_from_slice(&e.stored_ms.to_le_bytes());
    }
}

pub fn encode_checkpoint(start: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&start.to_le_bytes());
}

/// A bounded reader over a record payload.
struct Reader<'a> {
    buf: &'a [u8],
    record_type: u8,
}

impl<'a> Reader<'a> {
    fn err(&self, why: &'static str) -> RecordError {
        RecordError {
            record_type: self.record_type,
            why,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.buf.len() < n {
            return Err(self.err("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn id16(&mut self) -> Result<[u8; 16], RecordError> {
        Ok(self.take(16)?.try_into().expect("16 bytes"))
    }
    fn str8(&mut self) -> Result<&'a str, RecordError> {
        let len = self.take(1)?[0] as usize;
        std::str::from_utf8(self.take(len)?).map_err(|_| self.err("invalid UTF-8"))
    }
    fn finish(&self) -> Result<(), RecordError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

pub fn decode(record_type: u8, payload: &[u8]) -> Result<Decoded<'_>, RecordError> {
    let mut r = Reader {
        buf: payload,
        record_type,
    };
    let decoded = match record_type {
        MSG => {
            let recipient = r.str8()?;
            let seq = r.u64()?;
            let sender = r.str8()?;
            let msg_id = r.id16()?;
            let sent_ms = r.u64()?;
            let body_len = r.u32()? as usize;
            let body = r.take(body_len)?;
            Decoded::Msg(MsgRecord {
                recipient,
                seq,
                sender,
                msg_id,
                sent_ms,
                body,
            })
        }
        ACK => {
            let recipient = r.str8()?;
            Decoded::Ack {
                recipient,
                acked_seq: r.u64()?,
            }
        }
        DEDUP => {
            let count = r.u32()? as usize;
            if count > DEDUP_ENTRIES_PER_RECORD {
                return Err(r.err("too many dedup entries"));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let sender_hash = r.u64()?;
                let msg_id = r.id16()?;
                let stored_ms = r.u64()?;
                entries.push(DedupEntry {
                    sender_hash,
                    msg_id,
                    stored_ms,
                });
            }
            Decoded::Dedup(entries)
        }
        CKPT => Decoded::Checkpoint { start: r.u64()? },
        _ => return Err(r.err("unknown record type")),
    };
    r.finish()?;
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_round_trips() {
        let mut buf = Vec::new();
        let m = MsgRecord {
            recipient: "bob",
            seq: 7,
            sender: "alice",
            msg_id: [9; 16],
            sent_ms: 123,
            body: b"hello",
        };
        encode_msg(&m, &mut buf);
        assert_eq!(decode(MSG, &buf).unwrap(), Decoded::Msg(m));
        encode_ack("bob", 5, &mut buf);
        assert_eq!(
            decode(ACK, &buf).unwrap(),
            Decoded::Ack {
                recipient: "bob",
                acked_seq: 5
            }
        );
        let e = DedupEntry {
            sender_hash: 1,
            msg_id: [2; 16],
            stored_ms: 3,
        };
        encode_dedup(&[e, e], &mut buf);
        assert_eq!(decode(DEDUP, &buf).unwrap(), Decoded::Dedup(vec![e, e]));
        encode_checkpoint(42, &mut buf);
        assert_eq!(
            decode(CKPT, &buf).unwrap(),
            Decoded::Checkpoint { start: 42 }
        );
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors() {
        let mut buf = Vec::new();
        encode_ack("bob", 5, &mut buf);
        for cut in 0..buf.len() {
            assert!(decode(ACK, &buf[..cut]).is_err());
        }
        buf.push(0);
        assert!(decode(ACK, &buf).is_err());
        assert!(decode(99, &[]).is_err());
    }
}

/// Entry point for the fuzzer (engine/fuzz, target `decode_record`). Here, not
/// in the target, so it is compiled and property-tested with the crate and
/// cannot rot.
#[doc(hidden)]
pub mod fuzzing {
    use super::{decode, encode_ack, encode_checkpoint, encode_dedup, encode_msg, Decoded};

    /// The first byte is the record type, the rest the payload. Asserts what
    /// must hold for any input: a decoded record re-encodes to exactly the
    /// payload, and an error names the record type it was given.
    pub fn decode_record(data: &[u8]) {
        let Some((&record_type, payload)) = data.split_first() else {
            return;
        };
        match decode(record_type, payload) {
            Ok(decoded) => {
                let mut out = Vec::new();
                match &decoded {
                    Decoded::Msg(m) => encode_msg(m, &mut out),
                    Decoded::Ack {
                        recipient,
                        acked_seq,
                    } => encode_ack(recipient, *acked_seq, &mut out),
                    Decoded::Dedup(entries) => encode_dedup(entries, &mut out),
                    Decoded::Checkpoint { start } => encode_checkpoint(*start, &mut out),
                }
                assert_eq!(out, payload, "type {record_type}: {decoded:?}");
            }
            Err(e) => assert_eq!(e.record_type, record_type),
        }
    }
}

#[cfg(test)]
mod fuzz_props {
    use super::*;
    use proptest::prelude::*;

    /// User ids as the engine writes them: at most 64 bytes (16 chars of at
    /// most 4 bytes each).
    fn user() -> impl Strategy<Value = String> {
        ".{0,16}"
    }

    fn dedup_entry() -> impl Strategy<Value = DedupEntry> {
        (any::<u64>(), any::<[u8; 16]>(), any::<u64>()).prop_map(
            |(sender_hash, msg_id, stored_ms)| DedupEntry {
                sender_hash,
                msg_id,
                stored_ms,
            },
        )
    }

    /// A record type byte: mostly the known ones, sometimes anything.
    fn record_type() -> impl Strategy<Value = u8> {
        prop_oneof![Just(MSG), Just(ACK), Just(DEDUP), Just(CKPT), any::<u8>()]
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic_the_decoder(
            record_type in record_type(),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut data = vec![record_type];
            data.extend_from_slice(&payload);
            fuzzing::decode_record(&data);
        }

        #[test]
        fn mangled_records_never_panic_the_decoder(
            recipient in user(),
            body in proptest::collection::vec(any::<u8>(), 0..64),
            entries in proptest::collection::vec(dedup_entry(), 0..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bits in 1u8..,
        ) {
            let mut buf = Vec::new();
            for record_type in [MSG, ACK, DEDUP, CKPT] {
                match record_type {
                    MSG => encode_msg(
                        &MsgRecord {
                            recipient: &recipient,
                            seq: 1,
                            sender: &recipient,
                            msg_id: [7; 16],
                            sent_ms: 2,
                            body: &body,
                        },
                        &mut buf,
                    ),
                    ACK => encode_ack(&recipient, 3, &mut buf),
                    DEDUP => encode_dedup(&entries, &mut buf),
                    _ => encode_checkpoint(4, &mut buf),
                }
                // One byte changed (often a length), then cut short.
                let i = flip.index(buf.len());
                buf[i] ^= bits;
                let mut data = vec![record_type];
                data.extend_from_slice(&buf);
                fuzzing::decode_record(&data);
                let keep = cut.index(data.len() + 1);
                fuzzing::decode_record(&data[..keep]);
            }
        }

        #[test]
        fn msg_records_round_trip(
            recipient in user(),
            seq in any::<u64>(),
            sender in user(),
            msg_id in any::<[u8; 16]>(),
            sent_ms in any::<u64>(),
            body in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let m = MsgRecord { recipient: &recipient, seq, sender: &sender, msg_id, sent_ms, body: &body };
            let mut buf = Vec::new();
            encode_msg(&m, &mut buf);
            prop_assert_eq!(decode(MSG, &buf), Ok(Decoded::Msg(m)));
            prop_assert!(decode(MSG, &buf[..buf.len() - 1]).is_err());
        }

        #[test]
        fn ack_records_round_trip(recipient in user(), acked_seq in any::<u64>()) {
            let mut buf = Vec::new();
            encode_ack(&recipient, acked_seq, &mut buf);
            prop_assert_eq!(
                decode(ACK, &buf),
                Ok(Decoded::Ack { recipient: &recipient, acked_seq })
            );
        }

        #[test]
        fn dedup_records_round_trip(
            entries in proptest::collection::vec(dedup_entry(), 0..=64),
        ) {
            let mut buf = Vec::new();
            encode_dedup(&entries, &mut buf);
            prop_assert_eq!(decode(DEDUP, &buf), Ok(Decoded::Dedup(entries)));
        }

        #[test]
        fn dedup_counts_past_the_limit_are_errors(extra in 1u32..=u32::MAX - DEDUP_ENTRIES_PER_RECORD as u32) {
            let count = DEDUP_ENTRIES_PER_RECORD as u32 + extra;
            let err = decode(DEDUP, &count.to_le_bytes()).unwrap_err();
            prop_assert_eq!(err.why, "too many dedup entries");
        }

        #[test]
        fn checkpoint_records_round_trip(start in any::<u64>()) {
            let mut buf = Vec::new();
            encode_checkpoint(start, &mut buf);
            prop_assert_eq!(decode(CKPT, &buf), Ok(Decoded::Checkpoint { start }));
        }
    }
}
