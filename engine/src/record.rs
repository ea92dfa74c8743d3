//! The engine's WAL record payloads, sans-IO: the `wal` crate frames, checksums
//! and positions each record; this module owns what is inside.
//!
//! All integers little-endian. `str8` = u8 length + UTF-8 bytes.
//!
//! | type | name   | payload |
//! |------|--------|---------|
//! | 1    | MSG    | str8 recipient, u64 seq, str8 sender, [16] msg_id, u64 sent_ms, u32 body_len, body |
//! | 2    | ACK    | str8 recipient, u64 acked_seq: every seq <= acked_seq is consumed |
//! | 3    | DEDUP  | u32 count, then count x (u64 sender_hash, [16] msg_id, u64 stored_ms): read only (logs before slot moves; the slot is unknown) |
//! | 4    | CKPT   | u64 checkpoint_start_position: the live state restated since it is complete |
//! | 5    | SLOTS  | u32 version, u16 first, u16 last, u16 owner, u16 handoff_to (0xFFFF: none): who serves slots first..=last from this version on (shard 0's log only) |
//! | 6    | DEDUP2 | u32 count, then count x (u64 sender_hash, [16] msg_id, u64 stored_ms, u16 recipient_slot) |
//! | 7    | DROP   | u16 first, u16 last: the users of slots first..=last (inboxes, dedup entries) are forgotten |
//!
//! Replay is idempotent and a checkpoint only restates state (ACK first, then the
//! pending MSGs of each recipient, then DEDUP batches), so a crash in the middle
//! of writing a checkpoint leaves a log that still replays to the right state.

pub const MSG: u8 = 1;
pub const ACK: u8 = 2;
pub const DEDUP: u8 = 3;
pub const CKPT: u8 = 4;
pub const SLOTS: u8 = 5;
pub const DEDUP2: u8 = 6;
pub const DROP: u8 = 7;

/// A dedup entry's recipient slot when its record (type 3, written before
/// slot moves existed) did not say: such an entry goes with every move.
pub const SLOT_UNKNOWN: u16 = u16::MAX;
/// `SlotsRecord::handoff_to` on the wire when there is none.
const NO_HANDOFF: u16 = u16::MAX;

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
    /// The recipient's slot (SLOT_UNKNOWN from a type 3 record).
    pub slot: u16,
}

/// Who serves a slot range, from `version` on (docs/CLUSTER.md, moving slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotsRecord {
    /// Orders the decisions about a slot: a higher version wins; the cluster
    /// file is version 0.
    pub version: u32,
    pub first: u16,
    pub last: u16,
    /// The pair serving the range.
    pub owner: u16,
    /// The owner is handing the range to this pair: its users' SENDs wait.
    pub handoff_to: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    Msg(MsgRecord<'a>),
    Ack { recipient: &'a str, acked_seq: u64 },
    Dedup(Vec<DedupEntry>),
    Checkpoint { start: u64 },
    Slots(SlotsRecord),
    Drop { first: u16, last: u16 },
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

/// A DEDUP2 record (type 6).
pub fn encode_dedup(entries: &[DedupEntry], out: &mut Vec<u8>) {
    encode_dedup_entries(entries, true, out);
}

/// A DEDUP record of the old format (type 3, no slots): what logs written
/// before slot moves hold; for the tests and the fuzzer's round trip.
#[doc(hidden)]
pub fn encode_dedup_unslotted(entries: &[DedupEntry], out: &mut Vec<u8>) {
    encode_dedup_entries(entries, false, out);
}

fn encode_dedup_entries(entries: &[DedupEntry], slotted: bool, out: &mut Vec<u8>) {
    assert!(entries.len() <= DEDUP_ENTRIES_PER_RECORD);
    out.clear();
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.sender_hash.to_le_bytes());
        out.extend_from_slice(&e.msg_id);
        out.extend_from_slice(&e.stored_ms.to_le_bytes());
        if slotted {
            out.extend_from_slice(&e.slot.to_le_bytes());
        }
    }
}

pub fn encode_slots(r: &SlotsRecord, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&r.version.to_le_bytes());
    for v in [r.first, r.last, r.owner, r.handoff_to.unwrap_or(NO_HANDOFF)] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn encode_drop(first: u16, last: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&last.to_le_bytes());
}

pub fn encode_checkpoint(start: u64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&start.to_le_bytes());
}

/// Records outside a WAL (a slot move's export, engine::moves): each
/// `[u8 type][u32 len][payload]`.
pub fn push_framed(out: &mut Vec<u8>, record_type: u8, payload: &[u8]) {
    out.push(record_type);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Iterates `push_framed` records as (type, payload); stops at the first
/// incomplete one, which `rest` then begins with (empty: all were whole).
pub struct Framed<'a> {
    pub rest: &'a [u8],
}

pub fn framed(buf: &[u8]) -> Framed<'_> {
    Framed { rest: buf }
}

impl<'a> Iterator for Framed<'a> {
    type Item = (u8, &'a [u8]);
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&record_type, rest) = self.rest.split_first()?;
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let payload = rest.get(4..4 + len)?;
        self.rest = &rest[4 + len..];
        Some((record_type, payload))
    }
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
    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes(b.try_into().expect("2 bytes")))
    }
    /// A slot number (below net::SLOT_COUNT).
    fn slot(&mut self) -> Result<u16, RecordError> {
        let slot = self.u16()?;
        if slot >= net::SLOT_COUNT {
            return Err(self.err("slot out of range"));
        }
        Ok(slot)
    }
    /// `first..=last`, both slots, first <= last.
    fn slot_range(&mut self) -> Result<(u16, u16), RecordError> {
        let (first, last) = (self.slot()?, self.slot()?);
        if first > last {
            return Err(self.err("slot range reversed"));
        }
        Ok((first, last))
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
        DEDUP | DEDUP2 => {
            let count = r.u32()? as usize;
            if count > DEDUP_ENTRIES_PER_RECORD {
                return Err(r.err("too many dedup entries"));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let sender_hash = r.u64()?;
                let msg_id = r.id16()?;
                let stored_ms = r.u64()?;
                let slot = match record_type {
                    // A checkpoint restates entries of old logs as DEDUP2 too.
                    DEDUP2 => match r.u16()? {
                        SLOT_UNKNOWN => SLOT_UNKNOWN,
                        s if s < net::SLOT_COUNT => s,
                        _ => return Err(r.err("slot out of range")),
                    },
                    _ => SLOT_UNKNOWN,
                };
                entries.push(DedupEntry {
                    sender_hash,
                    msg_id,
                    stored_ms,
                    slot,
                });
            }
            Decoded::Dedup(entries)
        }
        CKPT => Decoded::Checkpoint { start: r.u64()? },
        SLOTS => {
            let version = r.u32()?;
            let (first, last) = r.slot_range()?;
            let owner = r.u16()?;
            let handoff_to = match r.u16()? {
                NO_HANDOFF => None,
                to => Some(to),
            };
            if handoff_to == Some(owner) {
                return Err(r.err("a pair hands slots off to itself"));
            }
            Decoded::Slots(SlotsRecord {
                version,
                first,
                last,
                owner,
                handoff_to,
            })
        }
        DROP => {
            let (first, last) = r.slot_range()?;
            Decoded::Drop { first, last }
        }
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
            slot: 4,
        };
        encode_dedup(&[e, e], &mut buf);
        assert_eq!(decode(DEDUP2, &buf).unwrap(), Decoded::Dedup(vec![e, e]));
        encode_dedup_unslotted(&[e], &mut buf);
        let old = DedupEntry {
            slot: SLOT_UNKNOWN,
            ..e
        };
        assert_eq!(decode(DEDUP, &buf).unwrap(), Decoded::Dedup(vec![old]));
        let slots = SlotsRecord {
            version: 3,
            first: 10,
            last: 20,
            owner: 1,
            handoff_to: Some(2),
        };
        encode_slots(&slots, &mut buf);
        assert_eq!(decode(SLOTS, &buf).unwrap(), Decoded::Slots(slots));
        encode_drop(5, 16383, &mut buf);
        assert_eq!(
            decode(DROP, &buf).unwrap(),
            Decoded::Drop {
                first: 5,
                last: 16383
            }
        );
        encode_drop(5, 16384, &mut buf);
        assert!(decode(DROP, &buf).is_err(), "slot 16384 does not exist");
        encode_drop(6, 5, &mut buf);
        assert!(decode(DROP, &buf).is_err(), "a reversed range");
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
    use super::{
        decode, encode_ack, encode_checkpoint, encode_dedup, encode_dedup_unslotted, encode_drop,
        encode_msg, encode_slots, Decoded, DEDUP,
    };

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
                    Decoded::Dedup(entries) if record_type == DEDUP => {
                        encode_dedup_unslotted(entries, &mut out)
                    }
                    Decoded::Dedup(entries) => encode_dedup(entries, &mut out),
                    Decoded::Checkpoint { start } => encode_checkpoint(*start, &mut out),
                    Decoded::Slots(r) => encode_slots(r, &mut out),
                    Decoded::Drop { first, last } => encode_drop(*first, *last, &mut out),
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
        (
            any::<u64>(),
            any::<[u8; 16]>(),
            any::<u64>(),
            0..net::SLOT_COUNT,
        )
            .prop_map(|(sender_hash, msg_id, stored_ms, slot)| DedupEntry {
                sender_hash,
                msg_id,
                stored_ms,
                slot,
            })
    }

    /// A record type byte: mostly the known ones, sometimes anything.
    fn record_type() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(MSG),
            Just(ACK),
            Just(DEDUP),
            Just(CKPT),
            Just(SLOTS),
            Just(DEDUP2),
            Just(DROP),
            any::<u8>()
        ]
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
            for record_type in [MSG, ACK, DEDUP, CKPT, SLOTS, DEDUP2, DROP] {
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
                    DEDUP => encode_dedup_unslotted(&entries, &mut buf),
                    DEDUP2 => encode_dedup(&entries, &mut buf),
                    SLOTS => encode_slots(
                        &SlotsRecord { version: 1, first: 2, last: 3, owner: 0, handoff_to: Some(1) },
                        &mut buf,
                    ),
                    DROP => encode_drop(2, 3, &mut buf),
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
            prop_assert_eq!(decode(DEDUP2, &buf), Ok(Decoded::Dedup(entries)));
        }

        #[test]
        fn slots_records_round_trip(
            version in any::<u32>(),
            a in 0..net::SLOT_COUNT,
            b in 0..net::SLOT_COUNT,
            owner in 0u16..1024,
            to in proptest::option::of(0u16..1024),
        ) {
            let handoff_to = to.filter(|&t| t != owner);
            let r = SlotsRecord { version, first: a.min(b), last: a.max(b), owner, handoff_to };
            let mut buf = Vec::new();
            encode_slots(&r, &mut buf);
            prop_assert_eq!(decode(SLOTS, &buf), Ok(Decoded::Slots(r)));
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
